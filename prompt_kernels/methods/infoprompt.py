"""InfoPrompt: information-theoretic soft prompt tuning (Wu et al., NeurIPS 2023). Input style.

A learnable soft prompt ``P [p, d]`` is prepended to the input embeddings (as prompt tuning, vocabulary
init); two mutual-information losses, each an InfoNCE bound, are added to the task loss::

    loss = task + w_t * γ * L_head + w_t * β * L_rep        (w_t = 1, or 1 - step / total with decay="linear")

Critic: ``f(u, v) = min(<u, v> / sqrt(d), clamp)`` (a scaled dot product, every score clamped from
above at ``clamp`` = 2, per example and per score, before the logsumexp; a clamped score has no
gradient). For one example with positive score ``s+`` and negative scores ``s-_1..s-_n`` the bound's
loss is ``logsumexp(s+, s-_1, ..., s-_n) - s+`` (>= 0; the InfoNCE estimate of the MI is
``log(n + 1)`` minus it); each loss is the mean of that over the batch.

Head loss ``L_head`` (prompt vs task head): ``e = mean_j sg(E_label[j])`` ``[d]`` (label words'
embeddings or the classifier's weight rows, see below), ``s+ = f(mean_k P_k, e)`` (the same for every
example), negatives ``s-_t = f(E(x_t), e)`` for every real token ``t`` of the example (the frozen input
embeddings, padding excluded).

Representation loss ``L_rep`` (prompt vs output representation, given the input): context
``c = W_r mean_k sg(P_k)`` ``[d]`` (``W_r: d x d`` trainable, no bias, initialised to the identity),
``z_b = z(x_b, P)`` the prompted representation, ``z0_b = z(x_b)`` the same batch's representation
WITHOUT the prompt (``ctx.forward_without_prompts``, no gradient). For example ``b``:
``s+ = f(z_b, c)``, negatives ``f(z0_b', c)`` for every ``b'`` of the batch (``b`` included) and
``f(z_b', c)`` for every ``b' != b``. Gradients reach ``P`` through ``z`` and ``W_r`` through ``c``.

``z`` is the base model's pooled final hidden state (the backbone's ``last_hidden_state``, i.e. after
the final norm of decoders) over the real tokens: the mean of the real tokens for encoders, the last
real token for causal models (prompt rows excluded in both cases).

The label embeddings: ``head="label_words"``: the input embeddings of label words, given as
``attach(model, config, label_token_ids=[...])`` or ``method.set_label_token_ids([...])`` (one id or a
list of ids per label; a multi-token word is the mean of its tokens). ``head="classifier"``: the rows
of a classifier weight ``[num_labels, d]``, given by ``method.set_label_embeddings(tensor or
zero-argument callable returning it)`` (the command line passes ``lambda: head.linear.weight``);
without it the model's own task head is used when it has exactly one ``[n, d]`` weight matrix (e.g.
``BertForSequenceClassification.classifier``). ``E_label`` is detached: the head loss trains the prompt.

Progress (``decay="linear"``): the trainer calls ``method.set_progress(step, total_steps)`` before each
step's forward (``prompt_kernels/train.py`` does); the weights are multiplied by
``max(0, 1 - step / total_steps)``. Without calls the weights stay at their initial value.

The losses are computed in training mode, or whenever ``labels`` are given, at the outermost forward
(not during cached decoding); a loss whose current weight is 0 is skipped. They appear in
``PromptedModel.last_aux_losses`` as ``"infoprompt_head"`` (= w_t γ L_head) and ``"infoprompt_rep"``
(= w_t β L_rep); the unweighted values of the last forward are in ``method.last_losses``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig, check_choice, check_float, register_config
from prompt_kernels.methods.base import PromptMethod, register_method


@register_config
@dataclass
class InfoPromptConfig(PromptConfig):
    """InfoPrompt (METHODS.md; formulas in the module docstring of ``prompt_kernels.methods.infoprompt``).

    gamma: weight γ of the head loss. 0.1.
    beta: weight β of the representation loss. 0.2.
    clamp: upper clamp of every critic score ``<u, v> / sqrt(d)``. 2.0.
    decay: ``"none"`` (default) or ``"linear"``: γ and β decayed linearly to 0 over training
        (``method.set_progress(step, total_steps)``).
    head: where ``E_label`` comes from: ``"classifier"`` (default; classifier weight rows, via
        ``method.set_label_embeddings`` or the model's own task head) or ``"label_words"`` (embeddings
        of label words' token ids, via ``attach(..., label_token_ids=...)`` or
        ``method.set_label_token_ids``).
    """

    method: ClassVar[str] = "infoprompt"
    gamma: float = 0.1
    beta: float = 0.2
    clamp: float = 2.0
    decay: str = "none"
    head: str = "classifier"

    def __post_init__(self):
        super().__post_init__()
        check_float("gamma", self.gamma, 0.0)
        check_float("beta", self.beta, 0.0)
        check_float("clamp", self.clamp, 0.0, open_low=True)
        if not math.isfinite(self.clamp):
            raise ValueError(f"clamp must be finite, got {self.clamp}")
        check_choice("decay", self.decay, ("none", "linear"))
        check_choice("head", self.head, ("classifier", "label_words"))


def critic(u: torch.Tensor, v: torch.Tensor, clamp: float) -> torch.Tensor:
    """``min(<u, v> / sqrt(d), clamp)`` over the last dimension (broadcasting)."""
    return ((u * v).sum(-1) / math.sqrt(u.shape[-1])).clamp(max=clamp)


def infonce_loss(
    positive: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_b [logsumexp(positive_b, negatives_b[valid_b]) - positive_b]``.

    positive ``[B]``, negatives ``[B, n]`` (clamped scores), valid ``[B, n]`` bool or None (all valid).
    """
    if valid is not None:
        negatives = negatives.masked_fill(~valid, float("-inf"))
    scores = torch.cat([positive[:, None], negatives], dim=1)
    return (torch.logsumexp(scores, dim=1) - positive).mean()


def pooled(hidden: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """hidden ``[B, n + T, d]`` (``n`` prompt rows in front), mask ``[B, T]`` bool -> ``[B, d]`` float32:
    the last real token (causal) or the mean of the real tokens (encoders)."""
    hidden = hidden[:, hidden.shape[1] - mask.shape[1] :].float()
    if causal:
        last = (mask.long().cumsum(1) * mask.long()).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def _last_hidden(output) -> torch.Tensor | None:
    if output is None:
        return None
    if isinstance(output, dict) or hasattr(output, "last_hidden_state"):
        h = output.get("last_hidden_state") if isinstance(output, dict) else output.last_hidden_state
        if h is not None:
            return h
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 3:
        return output[0]
    return None


@register_method(InfoPromptConfig)
class InfoPrompt(PromptMethod):
    """Soft prompt ``P [p, d]`` (parameter ``prompt``, vocabulary-row init) + ``W_r`` (parameter
    ``context.weight [d, d]``): ``p d + d^2`` trainable parameters."""

    def __init__(self, config: InfoPromptConfig, info, label_token_ids=None, **options):
        super().__init__(config, info)
        d, dev = info.hidden_size, info.device
        vocab = info.input_embeddings.weight.shape[0]
        ids = torch.randint(0, vocab, (config.prompt_length,), device=info.input_embeddings.weight.device)
        self.prompt = nn.Parameter(info.embed_tokens(ids).float().to(dev))
        self.context = nn.Linear(d, d, bias=False, device=dev)
        with torch.no_grad():
            self.context.weight.copy_(torch.eye(d, device=dev))
        self._label_source: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self._label_ids: list[list[int]] | None = None
        self._step, self._total = 0, None
        self._hook = None
        self.last_losses: dict[str, torch.Tensor] = {}
        if label_token_ids is not None:
            self.set_label_token_ids(label_token_ids)

    # -- setters -----------------------------------------------------------------------------------
    def set_label_embeddings(self, source) -> None:
        """``E_label`` for ``head="classifier"``: a ``[num_labels, d]`` tensor or a zero-argument callable
        returning one (read at every forward, e.g. ``lambda: head.linear.weight``)."""
        if not (torch.is_tensor(source) or callable(source)):
            raise TypeError(f"set_label_embeddings needs a tensor or a callable, got {type(source).__name__}")
        if torch.is_tensor(source):
            self._check_label_matrix(source)
        self._label_source = source

    def set_label_token_ids(self, ids) -> None:
        """Label words for ``head="label_words"``: one token id or a list of token ids per label."""
        vocab = self.info.input_embeddings.weight.shape[0]
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError("label_token_ids must be a non-empty list (one id or list of ids per label)")
        rows = []
        for word in ids:
            word = [word] if isinstance(word, int) and not isinstance(word, bool) else word
            if not isinstance(word, (list, tuple)) or not word:
                raise ValueError(
                    f"label_token_ids: each label needs an int or a non-empty list of ints, got {word!r}"
                )
            for t in word:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"label_token_ids: {t!r} is not a token id in [0, {vocab})")
            rows.append(list(word))
        self._label_ids = rows

    def set_progress(self, step: int, total_steps: int) -> None:
        """Training progress for ``decay="linear"`` (call before the step's forward; step 0 = full weight)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._step, self._total = step, total_steps

    def loss_scale(self) -> float:
        """``w_t``: 1, or ``max(0, 1 - step / total_steps)`` with ``decay="linear"``."""
        if self.config.decay == "none" or self._total is None:
            return 1.0
        return max(0.0, 1.0 - self._step / self._total)

    # -- pieces ------------------------------------------------------------------------------------
    def _check_label_matrix(self, t: torch.Tensor) -> None:
        if t.dim() != 2 or t.shape[1] != self.info.hidden_size or t.shape[0] < 1:
            raise ValueError(
                f"label embeddings must have shape [num_labels, d={self.info.hidden_size}], got {tuple(t.shape)}"
            )

    def label_embeddings(self) -> torch.Tensor:
        """``sg(E_label)`` ``[num_labels, d]`` float32 on the method's device."""
        dev = self.prompt.device
        if self.config.head == "label_words":
            if self._label_ids is None:
                raise ValueError(
                    'InfoPrompt head="label_words" needs label token ids: attach(model, config, '
                    "label_token_ids=[...]) or method.set_label_token_ids([...])"
                )
            return torch.stack(
                [self.info.embed_tokens(torch.tensor(w)).float().mean(0) for w in self._label_ids]
            ).to(dev)
        src = self._label_source
        if src is None:
            mats = [
                p
                for p in self.info.head_parameters().values()
                if p.dim() == 2 and p.shape[1] == self.info.hidden_size
            ]
            if len(mats) != 1:
                raise ValueError(
                    'InfoPrompt head="classifier" needs the classifier weights: call '
                    "method.set_label_embeddings(tensor or callable) (the model has no single [n, d] head matrix)"
                )
            src = mats[0]
        t = src() if callable(src) else src
        self._check_label_matrix(t)
        return t.detach().float().to(dev)

    def head_loss(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``L_head`` from the input embeddings ``[B, T, d]`` and the real-token mask ``[B, T]``."""
        e = self.label_embeddings().mean(0)
        clamp = self.config.clamp
        positive = critic(self.prompt.mean(0), e, clamp).expand(embeddings.shape[0])
        negatives = critic(embeddings.detach().float(), e, clamp)
        return infonce_loss(positive, negatives, mask.bool())

    def representation_loss(self, z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """``L_rep`` from the prompted ``z [B, d]`` and unprompted ``z0 [B, d]`` representations."""
        B, clamp = z.shape[0], self.config.clamp
        c = self.context(self.prompt.detach().mean(0))
        s = critic(z, c, clamp)  # [B] prompted: positives, and negatives for the other examples
        s0 = critic(z0.detach(), c, clamp)  # [B] unprompted: negatives for everyone
        others = s[None, :].expand(B, B)
        negatives = torch.cat([s0[None, :].expand(B, B), others], dim=1)
        valid = torch.cat(
            [
                torch.ones(B, B, dtype=torch.bool, device=z.device),
                ~torch.eye(B, dtype=torch.bool, device=z.device),
            ],
            dim=1,
        )
        return infonce_loss(s, negatives, valid)

    # -- hooks -------------------------------------------------------------------------------------
    def _capture_backbone(self, store: dict) -> None:
        """One-shot forward hook on the backbone storing its final hidden states in ``store``."""
        if self._hook is not None:
            self._hook.remove()

        def hook(module, args, output):
            store["hidden"] = _last_hidden(output)
            handle.remove()
            if self._hook is handle:
                self._hook = None

        handle = self.info.backbone.register_forward_hook(hook, always_call=True)
        self._hook = handle

    def _wants_losses(self, ctx) -> bool:
        return ctx.depth == 0 and not ctx.decoding and (ctx.training or ctx.labels is not None)

    def input_prompts(self, ctx):
        if self._wants_losses(ctx) and self.config.beta > 0 and self.info.backbone is not self.info.model:
            self._capture_backbone(ctx.cache.setdefault("infoprompt", {}))
        return self.prompt[None]

    def aux_losses(self, ctx, output):
        if not self._wants_losses(ctx):
            return {}
        scale, cfg = self.loss_scale(), self.config
        losses, raw = {}, {}
        if cfg.gamma * scale > 0:
            raw["head"] = self.head_loss(ctx.input_embeddings, ctx.attention_mask)
            losses["infoprompt_head"] = cfg.gamma * scale * raw["head"]
        if cfg.beta * scale > 0:
            hidden = _last_hidden(output) if self.info.backbone is self.info.model else None
            if hidden is None:
                hidden = ctx.cache.get("infoprompt", {}).get("hidden")
            if hidden is None:
                raise RuntimeError("InfoPrompt could not read the backbone's final hidden states")
            z = pooled(hidden, ctx.attention_mask, self.info.causal)
            with torch.no_grad():
                z0 = pooled(self._unprompted_hidden(ctx), ctx.attention_mask, self.info.causal)
            raw["rep"] = self.representation_loss(z, z0)
            losses["infoprompt_rep"] = cfg.beta * scale * raw["rep"]
        self.last_losses = {k: v.detach() for k, v in raw.items()}
        return losses

    def _unprompted_hidden(self, ctx) -> torch.Tensor:
        overrides = {"labels": None} if "labels" in ctx.kwargs else {}
        if self.info.backbone is self.info.model:
            hidden = _last_hidden(ctx.forward_without_prompts(**overrides))
        else:
            store: dict = {}
            self._capture_backbone(store)
            ctx.forward_without_prompts(**overrides)
            hidden = store.get("hidden")
        if hidden is None:
            raise RuntimeError(
                "InfoPrompt could not read the backbone's final hidden states (unprompted run)"
            )
        return hidden


__all__ = ["InfoPrompt", "InfoPromptConfig", "critic", "infonce_loss", "pooled"]
