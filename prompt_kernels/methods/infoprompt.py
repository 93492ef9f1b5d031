"""InfoPrompt: information-theoretic soft prompt tuning (Wu et al., NeurIPS 2023). Input style.

A learnable soft prompt ``P [p, d]`` is prepended to the input embeddings (as prompt tuning, vocabulary
init); two mutual-information losses, each an InfoNCE bound, are added to the task loss::

    loss = task + w_t * γ * L_head + w_t * β * L_rep        (w_t = 1, or 1 - step / total with decay="linear")

Critic: ``f(u, v) = min(<u, v> / sqrt(d), clamp)`` (a scaled dot product, every score clamped from
above at ``clamp`` = 2, per example and per score, before the logsumexp; a clamped score has no
gradient). For one example with positive score ``s+`` and negative scores ``s-_1..s-_n`` the bound's
loss is ``logsumexp(s+, s-_1, ..., s-_n) - s+`` (>= 0; the InfoNCE estimate of the MI is
``log(n + 1)`` minus it); each loss is the mean of that over the batch.

Head loss ``L_head`` (prompt vs task head; needs the gold class label ``y_b`` of each example):
``E = sg(E_label)`` ``[C, d]`` (label words' embeddings or the classifier's weight rows, see below),
``m = mean_k P_k``. For example ``b``: ``s+ = f(m, E_{y_b})``; negatives ``f(m, E_{y'})`` for every
other label ``y' != y_b``, and ``f(E(x_t), E_{y_b})`` for every real token ``t`` of the example (the
frozen input embeddings, padding excluded). The gradient reaches ``P`` through the positive and the
label negatives and depends on ``y_b`` for any number of classes. (Scoring the prompt against the mean
of all labels' rows would be inert: with two classes trained by cross-entropy their gradients are
exactly opposite, so the mean stays at its random start and carries no task information.)

Where the labels come from: ``labels`` of the forward call when they are class indices ``[B]`` (e.g. a
sequence-classification model), else ``method.set_labels(labels)`` called before the forward (one-shot:
used by the next training forward only; ``prompt_kernels/train.py``, whose base model takes no
labels, must call it). A training forward without class labels skips the head loss and warns once.

Representation loss ``L_rep`` (prompt vs output representation, given the input): an example-dependent
context ``c_b = W_r [sg(m); e(x_b)]`` with ``e(x_b)`` the mean of example ``b``'s real input embeddings
(``W_r: 2d -> d`` trainable, no bias, initialised to ``[I | I]``, so ``c_b = m + e(x_b)`` at the start),
``z_b = z(x_b, P)`` the prompted representation, ``z0_b = z(x_b)`` the same example's representation
WITHOUT the prompt (``ctx.forward_without_prompts``, no gradient, dropout off: a deterministic function
of the frozen model and the input). For example ``b``: ``s+ = f(z_b, c_b)``, negatives ``f(z0_b, c_b)``
(the same example without the prompt) and ``f(z_b', c_b)`` for every other example ``b' != b``.
Gradients reach ``P`` through ``z`` and ``W_r`` through ``c``.

``z`` is the base model's pooled final hidden state (the backbone's ``last_hidden_state``, i.e. after
the final norm of decoders) over the real tokens: the mean of the real tokens for encoders, the last
real token for causal models (prompt rows excluded in both cases).

The label embeddings: ``head="label_words"``: the input embeddings of label words, given as
``attach(model, config, label_token_ids=[...])`` or ``method.set_label_token_ids([...])`` (one id or a
list of ids per label; a multi-token word is the mean of its tokens). ``head="classifier"``: the rows
of a classifier weight ``[num_labels, d]``, given as ``attach(model, config, label_embeddings=tensor or
zero-argument callable returning it)`` or ``method.set_label_embeddings(...)`` (the command line passes
``lambda: head.linear.weight``); without it the model's own task head is used when it has exactly one
``[n, d]`` weight matrix (e.g. ``BertForSequenceClassification.classifier``). A classifier head that
has none or several (RoBERTa's and BART's two-layer ``classifier.dense`` + ``classifier.out_proj``) is
refused at ``attach`` (ValueError) unless ``label_embeddings=`` is given (or ``gamma=0``: no head
loss); a model without a task head (``AutoModel``) takes ``set_label_embeddings`` after ``attach``,
and a language-model head (whose token labels skip the head loss) is not checked.
``E_label`` is detached: the head loss trains the prompt.

Progress (``decay="linear"``): the trainer calls ``method.set_progress(step, total_steps)`` before each
step's forward (``prompt_kernels/train.py`` does); the weights are multiplied by
``max(0, 1 - step / total_steps)``. Without calls the weights stay at their initial value.

The losses are computed in training mode, or whenever ``labels`` are given, at the outermost forward
(not during cached decoding); a loss whose current weight is 0 is skipped. They appear in
``PromptedModel.last_aux_losses`` as ``"infoprompt_head"`` (= w_t γ L_head) and ``"infoprompt_rep"``
(= w_t β L_rep); the unweighted values of the last forward are in ``method.last_losses``.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig, check_bool, check_choice, check_float, register_config
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
        ``attach(..., label_embeddings=...)``, ``method.set_label_embeddings`` or the model's own task
        head) or ``"label_words"`` (embeddings
        of label words' token ids, via ``attach(..., label_token_ids=...)`` or
        ``method.set_label_token_ids``).
    cache_unprompted: keep each training row's unprompted representation ``z0`` (the pooled output of
        the frozen model without the prompt, dropout off: a function of the row alone) and skip the
        extra forward that computes it when every row of a batch was seen before. True (default); at
        most ``max(1024, 2^26 / d)`` rows (256 MB of float32), least recently used dropped first. Only
        valid while the base model stays frozen (``attach`` freezes it); ``method.clear_unprompted_cache()``
        after changing it.
    """

    method: ClassVar[str] = "infoprompt"
    gamma: float = 0.1
    beta: float = 0.2
    clamp: float = 2.0
    decay: str = "none"
    head: str = "classifier"
    cache_unprompted: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_float("gamma", self.gamma, 0.0)
        check_float("beta", self.beta, 0.0)
        check_float("clamp", self.clamp, 0.0, open_low=True)
        if not math.isfinite(self.clamp):
            raise ValueError(f"clamp must be finite, got {self.clamp}")
        check_choice("decay", self.decay, ("none", "linear"))
        check_choice("head", self.head, ("classifier", "label_words"))
        check_bool("cache_unprompted", self.cache_unprompted)


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
    """The final hidden states of the prompted input: an encoder-decoder's encoder output (the prompts
    and the context are the encoder's input), else ``last_hidden_state`` / the first output."""
    if output is None:
        return None
    encoder = output.get("encoder_last_hidden_state") if isinstance(output, dict) else None
    if encoder is None and not isinstance(output, dict):
        encoder = getattr(output, "encoder_last_hidden_state", None)
    if encoder is not None:
        return encoder
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
    ``context.weight [d, 2d]``): ``p d + 2 d^2`` trainable parameters."""

    def __init__(
        self, config: InfoPromptConfig, info, label_token_ids=None, label_embeddings=None, **options
    ):
        super().__init__(config, info)
        d, dev = info.hidden_size, info.device
        vocab = info.input_embeddings.weight.shape[0]
        ids = torch.randint(0, vocab, (config.prompt_length,), device=info.input_embeddings.weight.device)
        self.prompt = nn.Parameter(info.embed_tokens(ids).float().to(dev))
        self.context = nn.Linear(2 * d, d, bias=False, device=dev)
        with torch.no_grad():
            eye = torch.eye(d, device=dev)
            self.context.weight.copy_(torch.cat([eye, eye], dim=1))
        self._label_source: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self._label_ids: list[list[int]] | None = None
        self._pending_labels: torch.Tensor | None = None
        self._warned_no_labels = False
        self._step, self._total = 0, None
        self._z0_cache: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._backbone_store: dict | None = None  # where the backbone hook writes its next output
        self.last_losses: dict[str, torch.Tensor] = {}
        if label_token_ids is not None:
            self.set_label_token_ids(label_token_ids)
        if label_embeddings is not None:
            self.set_label_embeddings(label_embeddings)
        elif config.head == "classifier" and config.gamma > 0:
            self._check_task_head()

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

    def set_labels(self, labels) -> None:
        """The gold class labels ``[B]`` (ints in ``[0, num_labels)``) of the next forward, for the head
        loss when the forward call itself carries no class labels (one-shot: the next outermost
        forward takes them, whether it computes the losses or not). None clears them."""
        if labels is None:
            self._pending_labels = None
            return
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be integer class indices [B], got {labels.dtype} {tuple(labels.shape)}"
            )
        self._pending_labels = labels

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

    def _head_matrices(self) -> dict[str, torch.Tensor]:
        """The task head's weight matrices of width ``d`` (candidates for ``E_label``)."""
        d = self.info.hidden_size
        return {n: p for n, p in self.info.head_parameters().items() if p.dim() == 2 and p.shape[1] == d}

    def _check_task_head(self) -> None:
        """At construction (``attach``), without ``label_embeddings``: a task head (a classifier, not a
        vocabulary projection) that does not give ``E_label`` (none or several ``[n, d]`` matrices) is
        refused now, not at the first training forward. Left to later: a model without a task head
        (``set_label_embeddings`` after ``attach``) and language-model heads (their token labels never
        reach the head loss; ``set_labels`` with them needs ``set_label_embeddings``)."""
        model = self.info.model
        get_out = getattr(model, "get_output_embeddings", None)
        try:
            lm_head = get_out() if callable(get_out) else None
        except (AttributeError, NotImplementedError):
            lm_head = None
        head = self.info.head_parameters()
        mats = self._head_matrices()
        if lm_head is not None or not head or len(mats) == 1:
            return
        model = type(self.info.model).__name__
        d = self.info.hidden_size
        found = (
            f"{len(mats)} weight matrices of width d={d} ("
            + ", ".join(f"{n} {list(p.shape)}" for n, p in mats.items())
            + ")"
            if mats
            else f"no weight matrix of width d={d} (parameters: {', '.join(head)})"
        )
        raise ValueError(
            f'InfoPrompt head="classifier": the task head of {model} has {found}, not one '
            f"[num_labels, d] classifier matrix, so the label embeddings cannot be read off it. Pass "
            "label_embeddings= to attach (or load_prompts): a [num_labels, d] tensor or a zero-argument "
            "callable returning one (e.g. label_embeddings=lambda: model.classifier.out_proj.weight); or "
            'use head="label_words" with label_token_ids=[...], or gamma=0 (no head loss)'
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
            mats = list(self._head_matrices().values())
            if len(mats) != 1:
                raise ValueError(
                    'InfoPrompt head="classifier" needs the classifier weights: call '
                    "method.set_label_embeddings(tensor or callable) or pass label_embeddings= to attach "
                    "(the model has no single [n, d] head matrix)"
                )
            src = mats[0]
        t = src() if callable(src) else src
        self._check_label_matrix(t)
        return t.detach().float().to(dev)

    def head_loss(self, embeddings: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``L_head`` from the input embeddings ``[B, T, d]``, the real-token mask ``[B, T]`` and the gold
        class labels ``[B]``."""
        E = self.label_embeddings()  # [C, d]
        B, C = embeddings.shape[0], E.shape[0]
        labels = labels.to(E.device).long()
        if labels.shape != (B,):
            raise ValueError(
                f"InfoPrompt head loss: labels must have shape [B={B}], got {tuple(labels.shape)}"
            )
        # A data-dependent check: skipped while torch.compile traces (indexing then fails on its own).
        if not torch.compiler.is_compiling() and labels.numel() and (labels.min() < 0 or labels.max() >= C):
            raise ValueError(f"InfoPrompt head loss: labels must lie in [0, {C}) (the label rows)")
        clamp = self.config.clamp
        scores = critic(self.prompt.mean(0), E, clamp)  # [C]: the prompt against every label row
        gold = E[labels]  # [B, d]
        positive = scores[labels]  # [B]
        other_labels = scores[None, :].expand(B, C)
        tokens = critic(embeddings.detach().float(), gold[:, None, :], clamp)  # [B, T]
        negatives = torch.cat([other_labels, tokens], dim=1)
        not_gold = torch.arange(C, device=E.device)[None, :] != labels[:, None]
        valid = torch.cat([not_gold, mask.bool().to(E.device)], dim=1)
        return infonce_loss(positive, negatives, valid)

    def contexts(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``c [B, d]``: ``W_r [sg(mean_k P_k); e(x_b)]``, ``e(x_b)`` the mean real input embedding."""
        m = mask.to(torch.float32)[..., None]
        e = (embeddings.detach().float() * m).sum(1) / m.sum(1).clamp_min(1)
        prompt = self.prompt.detach().mean(0).expand(e.shape[0], -1)
        return self.context(torch.cat([prompt, e], dim=-1))

    def representation_loss(self, z: torch.Tensor, z0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``L_rep`` from the prompted ``z [B, d]``, unprompted ``z0 [B, d]`` representations and the
        contexts ``c [B, d]``."""
        B, clamp = z.shape[0], self.config.clamp
        scores = critic(z[None, :, :], c[:, None, :], clamp)  # [B (context b), B (representation b')]
        positive = scores.diagonal()
        unprompted = critic(z0.detach(), c, clamp)  # [B]: the same example without the prompt
        negatives = torch.cat([unprompted[:, None], scores], dim=1)
        valid = torch.cat(
            [
                torch.ones(B, 1, dtype=torch.bool, device=z.device),
                ~torch.eye(B, dtype=torch.bool, device=z.device),
            ],
            dim=1,
        )
        return infonce_loss(positive, negatives, valid)

    # -- hooks -------------------------------------------------------------------------------------
    def model_hooks(self) -> list:
        def hook(module, args, output):
            store = self._backbone_store
            hidden = _last_hidden(output) if store is not None else None
            if hidden is not None:  # else the output embeddings' input (below) may still give them
                store["hidden"] = hidden
                self._backbone_store = None

        handles = []
        if self.info.backbone is not self.info.model:
            handles.append(self.info.backbone.register_forward_hook(hook, always_call=True))
        # Some heads call a part of their backbone, not the backbone module itself (BART's, Pegasus's,
        # Blenderbot's *ForCausalLM call ``model.decoder``): then the input of the output embeddings,
        # the final hidden states, is what reaches the store.
        head = (
            self.info.model.get_output_embeddings()
            if hasattr(self.info.model, "get_output_embeddings")
            else None
        )
        if isinstance(head, nn.Module):

            def head_hook(module, args):
                store = self._backbone_store
                x = args[0] if args else None
                if store is not None and torch.is_tensor(x) and x.dim() == 3:
                    store["hidden"] = x
                    self._backbone_store = None

            handles.append(head.register_forward_pre_hook(head_hook))
        return handles

    def _capture_backbone(self, store: dict) -> None:
        """The backbone's next output (its final hidden states) goes to ``store`` (see ``model_hooks``)."""
        self._backbone_store = store

    def _wants_losses(self, ctx) -> bool:
        return ctx.depth == 0 and not ctx.decoding and (ctx.training or ctx.labels is not None)

    def input_prompts(self, ctx):
        if ctx.depth == 0 and not ctx.decoding:  # set_labels applies to this forward only
            ctx.cache["infoprompt_labels"], self._pending_labels = self._pending_labels, None
        if self._wants_losses(ctx) and self.config.beta > 0:
            self._capture_backbone(ctx.cache.setdefault("infoprompt", {}))
        return self.prompt[None]

    def _class_labels(self, ctx) -> torch.Tensor | None:
        pending = ctx.cache.get("infoprompt_labels")
        labels = ctx.labels
        if (
            torch.is_tensor(labels)
            and labels.dim() == 1
            and labels.shape[0] == ctx.batch_size
            and not labels.dtype.is_floating_point
        ):
            return labels
        if pending is not None:
            if pending.shape[0] != ctx.batch_size:
                raise ValueError(
                    f"InfoPrompt.set_labels got {pending.shape[0]} labels for a batch of {ctx.batch_size}"
                )
            return pending
        return None

    def aux_losses(self, ctx, output):
        if ctx.depth == 0:
            self._backbone_store = None  # the forward is over: nothing more to capture for it
        if not self._wants_losses(ctx):
            return {}
        scale, cfg = self.loss_scale(), self.config
        losses, raw = {}, {}
        labels = self._class_labels(ctx)
        if cfg.gamma * scale > 0:
            if labels is not None:
                raw["head"] = self.head_loss(ctx.input_embeddings, ctx.attention_mask, labels)
                losses["infoprompt_head"] = cfg.gamma * scale * raw["head"]
            elif not self._warned_no_labels:
                self._warned_no_labels = True
                warnings.warn(
                    "InfoPrompt: a training forward without class labels skips the head loss (pass "
                    "labels=[B] class indices, or call method.set_labels(labels) before the forward)",
                    stacklevel=2,
                )
        if cfg.beta * scale > 0:
            hidden = _last_hidden(output) if self.info.backbone is self.info.model else None
            if hidden is None:
                hidden = ctx.cache.get("infoprompt", {}).get("hidden")
            if hidden is None:
                raise RuntimeError("InfoPrompt could not read the backbone's final hidden states")
            if hidden.shape[-1] != self.info.hidden_size:
                raise NotImplementedError(
                    f"InfoPrompt's representation loss compares the final hidden states (width {hidden.shape[-1]}) "
                    f"with contexts in the input embeddings' space (width {self.info.hidden_size}); "
                    f"{type(self.info.model).__name__} has different widths (set beta=0 to train without it)"
                )
            z = pooled(hidden, ctx.attention_mask, self.info.causal)
            z0 = self._unprompted_representation(ctx)
            c = self.contexts(ctx.input_embeddings, ctx.attention_mask)
            raw["rep"] = self.representation_loss(z, z0, c)
            losses["infoprompt_rep"] = cfg.beta * scale * raw["rep"]
        self.last_losses = {k: v.detach() for k, v in raw.items()}
        return losses

    def clear_unprompted_cache(self) -> None:
        """Forget the cached unprompted representations (after changing the base model)."""
        self._z0_cache.clear()

    def _row_keys(self, ctx) -> list[bytes] | None:
        """One key per batch row: its token ids, mask and any token-type ids (None: not cacheable)."""
        if not self.config.cache_unprompted or ctx.input_ids is None or torch.compiler.is_compiling():
            return None
        parts = [ctx.input_ids.long(), ctx.attention_mask.long()]
        types = ctx.kwargs.get("token_type_ids")
        if torch.is_tensor(types) and types.shape == ctx.input_ids.shape:
            parts.append(types.long())
        rows = torch.cat(parts, dim=1).cpu().numpy()
        return [row.tobytes() for row in rows]

    def _unprompted_representation(self, ctx) -> torch.Tensor:
        """``z0`` ``[B, d]`` float32: the pooled final hidden states of the same rows without the prompt,
        from the cache when every row is in it (``cache_unprompted``), else from a forward."""
        keys = self._row_keys(ctx)
        cache = self._z0_cache
        if keys is not None and all(k in cache for k in keys):
            for k in keys:
                cache.move_to_end(k)
            return torch.stack([cache[k] for k in keys]).to(ctx.device)
        z0 = pooled(self._unprompted_hidden(ctx), ctx.attention_mask, self.info.causal)
        if keys is not None:
            limit = max(1024, 2**26 // z0.shape[-1])
            for k, row in zip(keys, z0.detach(), strict=True):
                cache[k] = row
                cache.move_to_end(k)
            while len(cache) > limit:
                cache.popitem(last=False)
        return z0

    def _unprompted_hidden(self, ctx) -> torch.Tensor:
        """The backbone's final hidden states of the same call without the prompt: no gradient, and
        with dropout off (every module of the model in eval mode for that run, then restored), so
        ``z0`` depends only on the frozen model and the input."""
        overrides = ctx.kwargs_without_labels()
        model = ctx.owner.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                store: dict = {}
                self._capture_backbone(store)
                out = ctx.forward_without_prompts(**overrides)
                hidden = _last_hidden(out) if self.info.backbone is self.info.model else None
                if hidden is None:
                    hidden = store.get("hidden")
        finally:
            self._backbone_store = None
            for m, mode in modes:
                m.training = mode
        if hidden is None:
            raise RuntimeError(
                "InfoPrompt could not read the backbone's final hidden states (unprompted run)"
            )
        return hidden


__all__ = ["InfoPrompt", "InfoPromptConfig", "critic", "infonce_loss", "pooled"]
