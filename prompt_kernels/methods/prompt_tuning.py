"""Prompt tuning (Lester et al. 2021): ``p`` trainable vectors prepended to the input embeddings."""

from __future__ import annotations

import torch
from torch import nn

from prompt_kernels.configs import PromptTuningConfig
from prompt_kernels.methods.base import PromptMethod, register_method


def _check_token_ids(ids, vocab: int, source: str = "init_token_ids") -> None:
    bad = [int(i) for i in ids if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(
            f"{source} hold id(s) {bad[:8]} outside the vocabulary: the model's input "
            f"embeddings have vocabulary size {vocab} (ids 0 .. {vocab - 1})"
        )


def initial_prompt(config: PromptTuningConfig, info, tokenizer=None) -> torch.Tensor:
    """``[p, d]`` float32 initial prompt following ``config.init`` (see PromptTuningConfig)."""
    p, emb = config.prompt_length, info.input_embeddings
    vocab = emb.weight.shape[0]
    if config.init_token_ids is not None:  # checked whatever ``init`` is: never silently ignored
        _check_token_ids(config.init_token_ids, vocab)
    if config.init == "random":
        std = float(emb.weight.detach().float().std())
        return torch.randn(p, info.hidden_size, device=info.device) * std
    if config.init == "vocab":
        ids = torch.randint(0, vocab, (p,), device=emb.weight.device)
    else:
        ids = config.init_token_ids
        if ids is None:
            if tokenizer is None:
                raise ValueError(
                    'init="text" with init_text needs attach(model, config, tokenizer=...) or init_token_ids'
                )
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init_text {config.init_text!r} tokenises to no tokens")
            _check_token_ids(
                ids, vocab, source=f"init_token_ids (the tokens of init_text {config.init_text!r})"
            )
            config.init_token_ids = list(ids)
        ids = torch.tensor((list(ids) * (p // len(ids) + 1))[:p], device=emb.weight.device)
    return info.embed_tokens(ids).float().to(info.device)


@register_method(PromptTuningConfig)
class PromptTuning(PromptMethod):
    """``Embedding(p, d)`` (stored as the parameter ``prompt [p, d]``), input style."""

    def __init__(self, config: PromptTuningConfig, info, tokenizer=None, **options):
        super().__init__(config, info)
        self.prompt = nn.Parameter(initial_prompt(config, info, tokenizer))

    def input_prompts(self, ctx):
        return self.prompt[None]
