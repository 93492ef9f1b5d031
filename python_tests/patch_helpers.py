"""Tiny random transformers models of every supported architecture, and small test-only prompt methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from prompt_kernels.configs import PromptConfig, check_float, check_int, register_config
from prompt_kernels.methods.base import PromptMethod, register_method

D, LAYERS, HEADS, VOCAB = 32, 2, 4, 99


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=D,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=37,
    max_position_embeddings=64,
)
_DECODER = dict(_COMMON, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)


def tiny_config(model_type: str, dropout: bool = True):
    from transformers import AutoConfig

    kw = {
        "bert": _COMMON,
        "roberta": dict(_COMMON, pad_token_id=1),
        "xlm-roberta": dict(_COMMON, pad_token_id=1),
        "camembert": dict(_COMMON, pad_token_id=1),
        "electra": dict(_COMMON, embedding_size=D),
        "distilbert": dict(
            vocab_size=VOCAB, dim=D, n_layers=LAYERS, n_heads=HEADS, hidden_dim=37, max_position_embeddings=64
        ),
        "gpt2": dict(
            vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=64, pad_token_id=0
        ),
        "llama": _DECODER,
        "qwen2": _DECODER,
        "qwen3": dict(_DECODER, head_dim=8),
        "mistral": dict(_DECODER, sliding_window=None),
        "gemma": dict(_DECODER, head_dim=8),
    }[model_type]
    cfg = AutoConfig.for_model(model_type, **kw)
    if not dropout:
        for name in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "dropout",
            "attention_dropout",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "seq_classif_dropout",
        ):
            if hasattr(cfg, name):
                setattr(cfg, name, 0.0)
    return cfg


ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")
DECODERS = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma")
MODEL_TYPES = ENCODERS + DECODERS


def tiny_model(model_type: str, head: str = "base", seed: int = 0, dropout: bool = True, **overrides):
    """head: "base" (AutoModel), "cls" (sequence classification, 3 labels) or "lm" (causal LM)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = tiny_config(model_type, dropout)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    if head == "base":
        model = AutoModel.from_config(cfg)
    elif head == "cls":
        cfg.num_labels = 3
        model = AutoModelForSequenceClassification.from_config(cfg)
    elif head == "lm":
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        raise ValueError(head)
    return model.eval()


def batch(model_type: str, B: int = 3, T: int = 7, pad_last: int = 2, seed: int = 1):
    """input_ids [B, T] (no pad ids inside the real tokens) and an attention mask with the last row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_last:
        mask[-1, T - pad_last :] = 0
        pad = tiny_config(model_type).pad_token_id
        ids[-1, T - pad_last :] = 0 if pad is None else pad
    return ids, mask


def assert_save_load_round_trip(pm, model_type: str, tmp_path, method_cls, **model_overrides):
    """Prompts saved from ``pm`` (in eval mode) and loaded onto a fresh tiny ``model_type`` classifier
    give bit-identical logits; returns the loaded model."""
    import prompt_kernels as pk

    ids, mask = batch(model_type)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
    pm.save_prompts(tmp_path)
    fresh = tiny_model(model_type, head="cls", dropout=False, **model_overrides)
    loaded = pk.load_prompts(fresh, tmp_path).eval()
    assert isinstance(loaded.method, method_cls) and loaded.prompt_config == pm.prompt_config
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    return loaded


def main_output(out):
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


# -- test-only methods --------------------------------------------------------------------------------
@register_config
@dataclass
class DeepPromptTestConfig(PromptConfig):
    """Hidden-space prompts at every layer through the frozen projections, a constant gate."""

    method: ClassVar[str] = "deep_prompt_test"
    gate: float = 1.0
    layers: list[int] | None = None
    input_dependent: bool = False  # add a projection of the mean real-token X^l (SPT-like)

    def __post_init__(self):
        super().__post_init__()
        check_float("gate", self.gate, 0.0, 1.0)


@register_method(DeepPromptTestConfig)
class DeepPromptTest(PromptMethod):
    def __init__(self, config, info, **options):
        super().__init__(config, info)
        self.prompts = nn.Parameter(torch.randn(info.num_layers, config.prompt_length, info.hidden_size))
        self.gates = nn.Parameter(torch.full((info.num_layers,), float(config.gate)))
        self.mix = nn.Linear(info.hidden_size, info.hidden_size) if config.input_dependent else None
        self.seen_inputs: list[torch.Tensor] = []

    def prefix(self, ctx, layer_idx):
        if self.config.layers is not None and layer_idx not in self.config.layers:
            return None
        p = self.prompts[layer_idx][None]
        if self.mix is not None:
            x = ctx.layer_input(layer_idx, real_only=True)
            m = ctx.attention_mask[..., None].to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1)
            p = p + self.mix(pooled)[:, None, :]
            self.seen_inputs.append(x)
        k, v = ctx.project_key_value(layer_idx, p)
        return k, v, self.gates[layer_idx].clamp(0, 1)


@register_config
@dataclass
class SequenceTestConfig(PromptConfig):
    """Sequence-style rows inserted at ``layer`` and shifted by a learnable delta after every layer."""

    method: ClassVar[str] = "sequence_test"
    layer: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("layer", self.layer, 0)


@register_method(SequenceTestConfig)
class SequenceTest(PromptMethod):
    def __init__(self, config, info, **options):
        super().__init__(config, info)
        self.sequence_layer = config.layer
        self.rows = nn.Parameter(torch.randn(config.prompt_length, info.hidden_size) * 0.5)
        self.delta = nn.Parameter(torch.randn(info.hidden_size) * 0.1)
        self.updates: list[int] = []

    def sequence_init(self, ctx):
        return self.rows[None]

    def sequence_update(self, ctx, layer_idx, rows):
        self.updates.append(layer_idx)
        return rows + self.delta


@register_config
@dataclass
class AuxTestConfig(PromptConfig):
    method: ClassVar[str] = "aux_test"
    nested: bool = False  # run the batch again (prompted) from aux_losses


@register_method(AuxTestConfig)
class AuxTest(PromptMethod):
    """Input-style prompts plus an auxiliary loss (the prompt's squared norm)."""

    def __init__(self, config, info, **options):
        super().__init__(config, info)
        self.prompt = nn.Parameter(torch.randn(config.prompt_length, info.hidden_size) * 0.1)
        self.depths: list[int] = []

    def input_prompts(self, ctx):
        return self.prompt[None]

    def aux_losses(self, ctx, output):
        self.depths.append(ctx.depth)
        if self.config.nested and ctx.depth == 0:
            ctx.owner.model(**{**ctx.kwargs, "labels": None})  # a nested prompted forward
        return {"norm": (self.prompt**2).sum()}


GREEDY = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def greedy_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B, steps, V]``: the logits of ``steps`` greedy decoding steps of ``model.generate``."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, **GREEDY
        )
    return torch.stack(out.logits, 1)


def assert_generate_equals_recompute(pm, ids: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """``pm.generate``'s greedy logits equal, step by step, a prompted forward over everything so far;
    returns them ``[B, steps, V]``."""
    got = greedy_logits(pm, ids, steps)
    seq, ref = ids, []
    with torch.no_grad():
        for _ in range(steps):
            logits = pm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            ref.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(got, torch.stack(ref, 1), rtol=1e-4, atol=1e-5)
    return got
