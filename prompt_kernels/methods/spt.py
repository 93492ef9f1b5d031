"""SPT: selective prompt tuning (Zhu & Tan, EMNLP 2023, "Learning to Selectively Insert Prompts").

A :class:`~prompt_kernels.nn.PromptGenerator` at every layer, each behind a learnable gate; the gates
are searched bi-level (first-order DARTS), the top-K layers are kept and the discrete model is
retrained. See METHODS.md ("SPT") for the formulation; here is how it maps onto the model.

Layers and generators (``L`` layers, indices ``0 .. L-1``). Generator/gate ``l`` reads ``X^l``, the
real tokens' hidden states *entering* layer ``l`` (``ctx.layer_input(l, real_only=True)``), and
produces the prompt that layer ``l`` uses. Generator 0 therefore reads the embedding output: it is
"the generator on the embedding output", gated like the others (``P^0 = a_0 G^0``). There are ``L``
generators and ``L`` gates::

    G^l = Generator_l(X^l, mask)                         [B, p, d]
    P^0 = a_0 G^0
    P^l = (1 - λ a_l) P^{l-1} + a_l G^l                  l = 1 .. L-1

- ``style="prefix"`` (default): ``P^l`` becomes layer ``l``'s prompt keys/values through layer
  ``l``'s frozen key/value projections (``ctx.project_key_value``), passed with gate 1 (None): the
  gate already acts in the propagation, so it is not applied a second time in the attention.
- ``style="sequence"``: ``P^0`` rows are inserted in front of the hidden states entering layer 0;
  after layer ``l-1`` the rows it output are ``P^{l-1}`` (processed by the layer), and
  ``P^l = (1 - λ a_l) P^{l-1} + a_l G^l`` (with ``X^l`` = the real tokens that layer ``l-1``
  output, i.e. the real tokens entering layer ``l``) is written back into those rows. The rows are
  removed after the last layer.

An encoder-decoder's encoder and decoder each carry their own chain (prefix style): the decoder's
starts at its first layer from the decoder tokens, and the generators pool each layer's own tokens
(``ctx.layer_mask``); the consistency loss compares the output over the decoder tokens
(``ctx.output_mask``).

Gates (search super-network, ``selected_layers=None``): ``a_l = σ(α_l)``, ``α`` zero-initialised
(``gate_logits [L]``). The forward uses the re-parameterised ``ã_l = a_l * sg(S) / S``,
``S = sum_j a_j``: the same values, with ``dã_l / da_k = δ_lk - a_l / S``, so

    dLoss/dα_k = a_k (1 - a_k) (g_k - sum_l g_l a_l / S),   g_l = dLoss/dã_l.

Architecture consistency: while training (``model.training``, outermost forward, super-network,
``consistency_weight > 0``) ``aux_losses`` draws ``m_l ~ Bern(1 - mask_rate)`` (``mask_rate`` = the
probability that a gate is *dropped*; 0.5 = Bern(0.5)), runs the same call again as a nested
forward of the model with gates ``ã_l * m_l`` (the random-number state is replayed so both runs see
the same dropout masks: the loss measures the architecture difference only) and returns
``{"spt_consistency": w_c * MSE(h_masked, h_full)}`` where ``h`` is the representation the task head
reads (``config.representation``): by default (``"pooled"``) the mean of the real tokens' final
hidden states for encoders and the last real token's for causal models (what the linear head of
``prompt-kernels train`` reads), from the output's ``last_hidden_state`` (else ``hidden_states[-1]``;
an output with only ``logits`` uses them: ``[B, C]`` as is, ``[B, T, V]`` at the last real token);
``"first"`` reads the first real token (``[CLS]``) of encoders; :meth:`SPT.set_representation` sets
any function. The PromptedModel adds the loss to ``loss`` when labels are given and exposes it in
``last_aux_losses``.

Discrete model (``selected_layers=[...]``): generators only at the selected layers, gates fixed at
1, no gate parameters and no consistency loss: ``P^l = (1 - λ) P^{l-1} + G^l`` at a selected layer,
``P^l = P^{l-1}`` at the others, and no prompt before the first selected layer.

Training (:func:`search`, :func:`select_layers`, :func:`build_discrete`, :func:`retrain`,
:func:`search_and_retrain`; :func:`cli_train`, the pipeline of ``prompt-kernels train --method spt``,
which runs it checkpointed and resumable mid-search: ``prompt_kernels/train.py``): see their
docstrings. One search step (first-order DARTS, METHODS.md):

1. ω step on a D1 batch, training mode: the task loss plus the consistency loss, one AdamW step of
   the generators (and the task head). The gates are frozen in the full run; the masked run of the
   consistency loss reads them through a detached copy of ``α`` that requires grad, so the backward
   also yields ``∂ consistency / ∂α`` through the masked run, at no extra pass.
2. α step on a D2 batch, eval mode (no dropout anywhere): the task loss; its gradient plus the
   consistency gradient of step 1 go to ``α``'s own Adam (learning rate ``gate_lr``; by default
   ``gate_travel / gate steps``, so Adam, which moves a parameter by about its learning rate per step,
   can move each ``α`` by ``gate_travel`` logit units over the search).

Cost: three forward+backward passes of the frozen model per search step (the D1 full and masked runs,
the D2 run); a discrete-model step is one. The chosen layers, the gate trajectory and the gate
learning rate are saved as ``spt_search.json`` next to the prompts (:class:`SearchRecord`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prompt_kernels.batch_order import SeededEpochs
from prompt_kernels.configs import (
    PromptConfig,
    check_choice,
    check_float,
    check_int,
    register_config,
)
from prompt_kernels.methods.base import PromptMethod, register_method
from prompt_kernels.nn.prompt_generator import ACTIVATIONS, PromptGenerator

SEARCH_FILE = "spt_search.json"
REPRESENTATIONS = ("pooled", "first", "logits")


@register_config
@dataclass
class SPTConfig(PromptConfig):
    """Selective prompt tuning (SPT).

    prompt_length: ``p``, prompt vectors produced by each generator.
    bottleneck: ``m``, the PHM bottleneck width of the generators (divisible by ``phm_n``). Default 64.
    phm_n: ``n``, the number of PHM rule matrices (the hidden size must be divisible by it). Default 4.
    activation: generator non-linearity: ``"relu"`` (default), ``"gelu"``, ``"silu"``, ``"tanh"``,
        ``"identity"``.
    dropout: dropout on each generator's output (after ``Up``). Default 0.1.
    lambda_: ``λ`` in ``P^l = (1 - λ a_l) P^{l-1} + a_l G^l``, in [0, 1]. 1 (default) lets a strong
        gate replace the incoming prompt; 0 only adds to it.
    style: ``"prefix"`` (default; ``P^l`` through layer ``l``'s frozen key/value projections) or
        ``"sequence"`` (prompt rows travelling through the layers and rewritten at each layer,
        closest to the paper).
    consistency_weight: ``w_c``, weight of the architecture-consistency loss (0 disables it and its
        second forward). Default 1.
    mask_rate: probability that the consistency mask drops a gate: ``m_l ~ Bern(1 - mask_rate)``.
        Default 0.5. 0 keeps every gate (the loss is then exactly 0).
    budget_k: ``K``, the number of layers kept after the search (capped at the number of layers).
        Default 4.
    gate_lr: learning rate of the gate parameters ``α`` in the bi-level search (their own Adam). None
        (default) = ``gate_travel / gate steps`` of the search.
    gate_travel: with ``gate_lr=None``, the distance in logit units Adam can move each ``α`` over the
        search (Adam moves a parameter by about its learning rate per step when the gradient's sign
        is steady). Default 8 (``σ(±4) = 0.98 / 0.02``: room for the gates to separate). With 50
        gate steps this is a learning rate of 0.16; the old fixed 1e-2 moved ``α`` by at most 0.5.
    gate_beta2: the second-moment decay of the gates' Adam (``betas=(0.9, gate_beta2)``). Default 0.999
        (PyTorch's). The gate gradients shrink by about an order of magnitude over the first steps of
        a search (MiniLM); with 0.999 Adam's normaliser remembers the early, large ones, so later
        gradients move ``α`` by a fraction of the learning rate. 0.9 makes every step count; on
        MiniLM / movie reviews it did not change which layers a seed picks.
    gate_warmup: the fraction of the search's steps, at its start, that run the ω step only (the
        gates stay at 0.5 while the generators learn), as DARTS variants warm up the weights before
        the architecture; the gate steps are the rest. In [0, 1). Default 0 (0.3 did not make the
        chosen layers agree across seeds on MiniLM / movie reviews).
    representation: what the consistency loss compares: ``"pooled"`` (default; mean of the real
        tokens' final hidden states for encoders, the last real token for causal models: what the
        linear head of ``prompt-kernels train`` reads), ``"first"`` (the first real token, ``[CLS]``,
        for encoders; the last real token for causal models) or ``"logits"`` (the model's output
        logits: ``[B, C]``, or ``[B, T, V]`` at the last real token).
    retrain_from: how :func:`build_discrete` initialises the kept generators: ``"scratch"`` (default;
        fresh generators, as in DARTS) or ``"searched"`` (the weights trained during the search, whose
        gates were below 1 and whose prompts were mixed with the previous layers'). Measured on
        MiniLM / movie reviews (3 seeds, 50 search + 50 retraining steps): scratch 0.732 ± 0.010,
        searched 0.672 ± 0.069 (``benchmarks/notes/methods_spt.md``).
    selected_layers: None (default) = the search super-network (a generator and a gate at every
        layer); a list of layer indices = the discrete model retrained after the search
        (generators only there, gates fixed at 1). Stored sorted, without duplicates.
    """

    method: ClassVar[str] = "spt"
    bottleneck: int = 64
    phm_n: int = 4
    activation: str = "relu"
    dropout: float = 0.1
    lambda_: float = 1.0
    style: str = "prefix"
    consistency_weight: float = 1.0
    mask_rate: float = 0.5
    budget_k: int = 4
    gate_lr: float | None = None
    gate_travel: float = 8.0
    gate_beta2: float = 0.999
    gate_warmup: float = 0.0
    representation: str = "pooled"
    retrain_from: str = "scratch"
    selected_layers: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int("bottleneck", self.bottleneck)
        check_int("phm_n", self.phm_n)
        if self.bottleneck % self.phm_n:
            raise ValueError(f"bottleneck={self.bottleneck} must be divisible by phm_n={self.phm_n}")
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_float("dropout", self.dropout, 0.0, 1.0)
        if self.dropout == 1.0:
            raise ValueError("dropout must be < 1")
        check_float("lambda_", self.lambda_, 0.0, 1.0)
        check_choice("style", self.style, ("prefix", "sequence"))
        check_float("consistency_weight", self.consistency_weight, 0.0)
        check_float("mask_rate", self.mask_rate, 0.0, 1.0)
        check_int("budget_k", self.budget_k)
        if self.gate_lr is not None:
            check_float("gate_lr", self.gate_lr, 0.0, open_low=True)
        check_float("gate_travel", self.gate_travel, 0.0, open_low=True)
        check_float("gate_beta2", self.gate_beta2, 0.0, 1.0)
        if self.gate_beta2 == 1.0:
            raise ValueError("gate_beta2 must be < 1")
        check_float("gate_warmup", self.gate_warmup, 0.0, 1.0)
        if self.gate_warmup == 1.0:
            raise ValueError("gate_warmup must be < 1 (some search steps must update the gates)")
        check_choice("representation", self.representation, REPRESENTATIONS)
        check_choice("retrain_from", self.retrain_from, ("searched", "scratch"))
        if self.selected_layers is not None:
            layers = self.selected_layers
            if isinstance(layers, tuple):
                layers = list(layers)
            if not isinstance(layers, list) or not layers:
                raise ValueError("selected_layers must be None or a non-empty list of layer indices")
            for v in layers:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"selected_layers must hold non-negative ints, got {v!r}")
            self.selected_layers = sorted(set(layers))


def propagate(previous: torch.Tensor, generated: torch.Tensor, gate, lambda_: float) -> torch.Tensor:
    """``P^l = (1 - λ a) P^{l-1} + a G^l`` (``previous``, ``generated``: ``[B, p, d]``; ``gate``: scalar)."""
    return (1 - lambda_ * gate) * previous + gate * generated


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@register_method(SPTConfig)
class SPT(PromptMethod):
    """The SPT prompt module (see the module docstring for the formulation).

    Parameters: ``generators`` (``ModuleDict`` keyed by the layer index as a string: every layer in
    the super-network, the selected ones in the discrete model) and, in the super-network only,
    ``gate_logits [L]`` (``α``, zeros at init).

    Runtime attributes (not saved): ``gate_mask`` (None or ``[L]``: multiplies the gates of every
    forward; for experiments and tests), ``record_prompts`` (keep the outermost forward's
    ``P^l`` in ``last_prompts`` and its gates in ``last_gates``), :meth:`consistency` (context
    manager switching the consistency loss off), :meth:`harvest_consistency_gradient` (the search's
    way of getting ``∂ consistency / ∂α`` from the ω step), :meth:`set_representation`.
    """

    def __init__(self, config: SPTConfig, info, **options):
        super().__init__(config, info)
        L, d = info.num_layers, info.hidden_size
        if d % config.phm_n:
            raise ValueError(f"SPT: hidden size {d} must be divisible by phm_n={config.phm_n}")
        self.discrete = config.selected_layers is not None
        if self.discrete:
            bad = [v for v in config.selected_layers if v >= L]
            if bad:
                raise ValueError(f"selected_layers {bad} out of range for a model with {L} layers")
            layers = list(config.selected_layers)
        else:
            layers = list(range(L))
        self.layers = tuple(layers)
        self.generators = nn.ModuleDict(
            {
                str(layer): PromptGenerator(
                    d,
                    config.prompt_length,
                    config.bottleneck,
                    config.phm_n,
                    config.activation,
                    config.dropout,
                    device=info.device,
                )
                for layer in layers
            }
        )
        if not self.discrete:
            self.gate_logits = nn.Parameter(torch.zeros(L, device=info.device))
        if config.style == "sequence":
            self.sequence_layer = layers[0]
        self.gate_mask: torch.Tensor | None = None
        self.record_prompts = False
        self.last_prompts: dict[int, torch.Tensor] = {}
        self.last_gates: torch.Tensor | None = None
        self._consistency_enabled = True
        self._masked_run: torch.Tensor | None = None
        self._masked_logits: torch.Tensor | None = None
        self._representation: Callable | None = None

    # -- gates --------------------------------------------------------------------------------------
    def gates(self) -> torch.Tensor:
        """``a = σ(α)`` ``[L]`` (the discrete model: 1 at the selected layers, 0 elsewhere)."""
        if self.discrete:
            g = torch.zeros(self.info.num_layers, device=self.info.device)
            g[list(self.layers)] = 1.0
            return g
        return torch.sigmoid(self.gate_logits)

    def reparameterised_gates(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``ã = a * sg(S) / S``, ``S = sum_j a_j`` ``[L]``: the values of ``a``, coupled gradients
        (``a = σ(logits)``, by default the gate parameters ``α``)."""
        a = torch.sigmoid(self.gate_logits if logits is None else logits)
        s = a.sum()
        return a * (s.detach() / s)

    def _forward_gates(self, ctx) -> torch.Tensor:
        def compute():
            masked = self._masked_run is not None
            g = self.reparameterised_gates(self._masked_logits if masked else None)
            if self.gate_mask is not None:
                g = g * self.gate_mask.to(g)
            if self._masked_run is not None:
                g = g * self._masked_run.to(g)
            if self.record_prompts and self._outermost(ctx):
                self.last_gates = g
            return g

        return ctx.memo("spt_gates", compute)

    @contextlib.contextmanager
    def harvest_consistency_gradient(self):
        """Within the block, the masked run of the consistency loss reads the gates through a detached
        copy of ``α`` that requires grad (yielded): after ``backward`` its ``.grad`` holds
        ``∂ consistency / ∂α`` through the masked run, whether or not ``α`` itself is frozen."""
        leaf = self.gate_logits.detach().clone().requires_grad_(True)
        old = self._masked_logits
        self._masked_logits = leaf
        try:
            yield leaf
        finally:
            self._masked_logits = old

    def set_representation(self, fn: Callable | None) -> None:
        """The representation the consistency loss compares: ``fn(output, attention_mask [B, T] bool)
        -> [B, ...]`` (None: ``config.representation``)."""
        if fn is not None and not callable(fn):
            raise TypeError(f"set_representation needs a callable or None, got {type(fn).__name__}")
        self._representation = fn

    def representation(self, output, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the consistency loss compares (see the module docstring)."""
        if self._representation is not None:
            return self._representation(output, attention_mask)
        return head_representation(output, attention_mask, self.info.causal, self.config.representation)

    def sample_consistency_mask(self) -> torch.Tensor:
        """``m [L]`` float: 1 keeps a gate, 0 drops it (``m_l ~ Bern(1 - mask_rate)``)."""
        return (torch.rand(self.info.num_layers) >= self.config.mask_rate).float()

    @contextlib.contextmanager
    def consistency(self, enabled: bool):
        """Within the block, the architecture-consistency loss is computed only if ``enabled``."""
        old = self._consistency_enabled
        self._consistency_enabled = enabled
        try:
            yield
        finally:
            self._consistency_enabled = old

    # -- propagation --------------------------------------------------------------------------------
    def _step(self, ctx, layer: int, previous: torch.Tensor | None, tokens: Callable[[], torch.Tensor]):
        """``P^layer`` from ``P^{layer-1}`` (None: no prompt yet) and the layer's real tokens ``X^layer``."""
        if self.discrete:
            if layer not in self.layers:
                return previous
            generated = self.generators[str(layer)](*self._generator_inputs(ctx, layer, tokens))
            if previous is None or self.config.lambda_ == 1.0:  # (1 - λ) P^{l-1} = 0: no work for it
                return generated
            return propagate(previous, generated, 1.0, self.config.lambda_)
        gate = self._forward_gates(ctx)[layer]
        generated = self.generators[str(layer)](*self._generator_inputs(ctx, layer, tokens))
        if previous is None:
            return gate * generated
        return propagate(previous, generated, gate, self.config.lambda_)

    def _generator_inputs(self, ctx, layer: int, tokens: Callable[[], torch.Tensor]):
        """Layer ``layer``'s real tokens ``[B, T, d]`` and their mask ``[B, T]``; NotImplementedError, naming
        the model, for layers whose inputs are not one hidden state per input token (extra streams,
        patch-level layers, another width)."""
        x, mask = tokens(), ctx.layer_mask(layer)
        if x.dim() != 3 or x.shape[-1] != self.info.hidden_size or tuple(x.shape[:2]) != tuple(mask.shape):
            raise NotImplementedError(
                f"SPT reads each layer's token hidden states [B, T, d={self.info.hidden_size}]; layer {layer} of "
                f"{type(self.info.model).__name__} gets {tuple(x.shape)} for a mask of {tuple(mask.shape)} "
                "(extra hidden streams, patch-level layers or another width): SPT cannot run on it"
            )
        return x, mask

    def _record(self, ctx, layer: int, prompt: torch.Tensor | None) -> None:
        if self.record_prompts and self._outermost(ctx) and prompt is not None:
            self.last_prompts[layer] = prompt.detach()

    # -- hooks --------------------------------------------------------------------------------------
    def input_prompts(self, ctx):
        # Not an input-style method: this hook runs before any dropout of the forward, so it is
        # where the random state is captured for the consistency run to replay.
        if self._outermost(ctx):
            self.last_prompts = {}
            if self._wants_consistency(ctx):
                ctx.cache["spt_rng"] = _rng_state(ctx.device)
        return None

    def prefix(self, ctx, layer_idx):
        if self.config.style != "prefix":
            return None
        state = ctx.cache.setdefault("spt_prefix", {"next": 0, "prompt": None, "stack": None})
        stack = self.info.sites[layer_idx].stack
        if layer_idx == 0 or stack != state["stack"]:
            # Each stack (an encoder-decoder's encoder, then its decoder) carries its own chain of
            # prompts: the decoder's starts from its own tokens (generate runs the two separately).
            state.update(next=layer_idx, prompt=None, stack=stack)
        if layer_idx < state["next"]:
            raise RuntimeError(
                f"SPT: layer {layer_idx} ran after layer {state['next'] - 1}; layers must run in order"
            )
        # A later layer than the next one: the layers between were skipped (LayerDrop in training); the
        # chain carries the prompt of the last layer that ran, as a skipped layer is the identity.
        prompt = self._step(
            ctx, layer_idx, state["prompt"], lambda: ctx.layer_input(layer_idx, real_only=True)
        )
        state.update(next=layer_idx + 1, prompt=prompt)
        self._record(ctx, layer_idx, prompt)
        if prompt is None:
            return None
        key, value = ctx.project_key_value(layer_idx, prompt)
        return key, value, None  # gate 1: the gating is in the propagation

    def sequence_init(self, ctx):
        layer = self.sequence_layer
        prompt = self._step(ctx, layer, None, lambda: ctx.layer_input(layer, real_only=True))
        self._record(ctx, layer, prompt)
        return prompt

    def sequence_update(self, ctx, layer_idx, rows):
        layer = layer_idx + 1
        if layer >= self.info.num_layers or (self.discrete and layer not in self.layers):
            if layer < self.info.num_layers:
                self._record(ctx, layer, rows)
            return rows
        prompt = self._step(ctx, layer, rows, lambda: _tokens_after_rows(rows, ctx))
        self._record(ctx, layer, prompt)
        return prompt.to(rows.dtype)

    # -- architecture consistency -------------------------------------------------------------------
    def _outermost(self, ctx) -> bool:
        # The PromptedModel pops a forward's context before calling aux_losses, so the masked run
        # started from there has depth 0 too: ``_masked_run`` tells it apart.
        return ctx.depth == 0 and self._masked_run is None

    def _wants_consistency(self, ctx) -> bool:
        return (
            not self.discrete
            and self._consistency_enabled
            and self.config.consistency_weight > 0
            and ctx.training
            and not ctx.decoding
            and self._outermost(ctx)
        )

    def aux_losses(self, ctx, output):
        if not self._wants_consistency(ctx) or "spt_rng" not in ctx.cache:
            return {}
        h_full = self.representation(output, ctx.output_mask)
        keep = self.sample_consistency_mask()
        kwargs = ctx.kwargs_without_labels()
        after = _rng_state(ctx.device)
        _set_rng_state(ctx.device, ctx.cache["spt_rng"])
        self._masked_run = keep.to(self.info.device, torch.float32)
        try:
            masked = ctx.owner.model(**kwargs)
        finally:
            self._masked_run = None
            _set_rng_state(ctx.device, after)
        h_masked = self.representation(masked, ctx.output_mask)
        loss = F.mse_loss(h_masked.float(), h_full.float())
        return {"spt_consistency": self.config.consistency_weight * loss}


def _tokens_after_rows(rows: torch.Tensor, ctx) -> torch.Tensor:
    """The real tokens output by the layer whose prompt rows are ``rows`` (``[B, T, d]``).

    ``sequence_update`` receives the rows as the view ``hidden[:, :p]`` of the layer's output
    ``hidden [B, p + T, d]``; the tokens are the rest of that tensor (``rows._base``).
    """
    base, p = rows._base, rows.shape[1]
    ok = (
        base is not None
        and base.dim() == 3
        and tuple(base.shape) == (rows.shape[0], p + ctx.seq_len, rows.shape[2])
        and base.data_ptr() == rows.data_ptr()
        and base.stride() == rows.stride()
    )
    if not ok:
        raise RuntimeError(
            "SPT sequence style: cannot find the layer output's real tokens behind the prompt rows "
            "(sequence_update no longer receives a view of the layer output)"
        )
    return base[:, p:]


def _output_field(output, name):
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def head_representation(
    output, attention_mask: torch.Tensor, causal: bool, kind: str = "pooled"
) -> torch.Tensor:
    """``[B, d]`` (or ``[B, C]`` logits): what a task head reads from a model output.

    ``kind``: ``"pooled"`` = mean of the real tokens' final hidden states (encoders) or the last real
    token's (causal models); ``"first"`` = the first real token (encoders) or the last real token
    (causal models); ``"logits"`` = the output's logits. The hidden states come from
    ``last_hidden_state``, else ``hidden_states[-1]``, else (an output with only logits) the logits:
    ``[B, C]`` as is, ``[B, T, V]`` at the last real token (causal) or pooled as ``kind`` says. Input-style
    prompt rows in front of the tokens are skipped (the last ``T`` positions are the tokens)."""
    if kind not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")
    h = None
    if kind != "logits":
        h = _output_field(output, "last_hidden_state")
        if h is None:
            states = _output_field(output, "hidden_states")
            h = states[-1] if states is not None else None
    if h is None:
        h = _output_field(output, "logits")
    if h is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        h = output[0]
    if h is None:
        raise ValueError(
            "SPT consistency: the model output has no last_hidden_state, hidden_states or logits"
        )
    if h.dim() == 2:
        return h
    mask = attention_mask.bool()
    T = mask.shape[1]
    h = h[:, -T:]
    rows = torch.arange(h.shape[0], device=h.device)
    if causal:
        return h[rows, T - 1 - mask.flip(1).int().argmax(1)]
    if kind == "pooled":
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1)
    return h[rows, mask.int().argmax(1)]


def classification_hidden(output, attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """The final hidden state of the classification token ``[B, d]``: the first real token of
    encoders, the last real token of causal models (``head_representation(..., "first")``)."""
    return head_representation(output, attention_mask, causal, "first")


# ================================ training: search, selection, retraining ================================


@dataclass
class SearchRecord:
    """What the search decided: saved as ``spt_search.json`` next to the prompts.

    gate_trajectory: ``a = σ(α)`` (one list of ``L`` floats) before the search and after each gate step.
    selected_layers: the top-K layers (None before selection).
    search_steps / retrain_steps: steps run (one search step = one ω step + one α step).
    gate_lr: the gates' learning rate the search used.
    retrain_from: ``"searched"`` or ``"scratch"``: how the discrete model's generators started.
    """

    gate_trajectory: list[list[float]] = field(default_factory=list)
    selected_layers: list[int] | None = None
    search_steps: int = 0
    retrain_steps: int = 0
    gate_lr: float | None = None
    retrain_from: str | None = None

    def gate_margin(self, k: int | None = None) -> float | None:
        """The smallest chosen gate minus the largest unchosen one, after the last gate step (None
        before selection or when every layer is chosen)."""
        if not self.gate_trajectory or self.selected_layers is None:
            return None
        gates = self.gate_trajectory[-1]
        chosen = [gates[i] for i in self.selected_layers]
        rest = [g for i, g in enumerate(gates) if i not in self.selected_layers]
        return min(chosen) - max(rest) if rest else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, SEARCH_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path) -> SearchRecord:
        with open(os.path.join(path, SEARCH_FILE)) as f:
            return cls(**json.load(f))


def _spt(pm) -> SPT:
    method = getattr(pm, "method", None)
    if not isinstance(method, SPT):
        raise TypeError(f"expected a PromptedModel with an SPT method, got {type(method).__name__}")
    return method


def omega_parameters(pm, head: nn.Module | None = None) -> list[nn.Parameter]:
    """``ω``: the trainable parameters except the gates (generators, a trainable head, ``head``)."""
    gates = {id(p) for p in alpha_parameters(pm)}
    params = [p for p in pm.prompt_parameters() if id(p) not in gates]
    return params + ([p for p in head.parameters() if p.requires_grad] if head is not None else [])


def alpha_parameters(pm) -> list[nn.Parameter]:
    """``α``: the gate logits (empty for the discrete model)."""
    method = _spt(pm)
    return [] if method.discrete else [method.gate_logits]


@contextlib.contextmanager
def _frozen(params: Iterable[nn.Parameter]):
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class EpochHalves(SeededEpochs):
    """:func:`epoch_halves` as a resumable iterator: its position and generator state are a
    ``state_dict`` (what ``prompt-kernels train`` checkpoints mid-search), so a resumed search draws
    the batches the uninterrupted one would have."""

    what = "search order"

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n < 2:
            raise ValueError(f"the bi-level search needs at least 2 training examples, got {n}")
        super().__init__(n, batch_size, seed)

    def _new_epoch(self, order: list[int]) -> None:
        self._d1, self._d2 = order[: self.n // 2], order[self.n // 2 :]
        self._bs = min(self.batch_size, len(self._d1))
        self._starts = range(0, len(self._d1) - self._bs + 1, self._bs)

    def _num_batches(self) -> int:
        return len(self._starts)

    def _batch(self, i: int) -> tuple[list[int], list[int]]:
        start = self._starts[i]
        return self._d1[start : start + self._bs], self._d2[start : start + self._bs]

    def __iter__(self) -> EpochHalves:
        return self

    def __next__(self) -> tuple[list[int], list[int]]:
        return self.next()


def epoch_halves(n: int, batch_size: int, seed: int = 0) -> Iterator[tuple[list[int], list[int]]]:
    """Endless ``(D1 batch, D2 batch)`` index pairs: each epoch the ``n`` examples are shuffled and split
    into halves D1, D2, and batches are drawn from both in step (an epoch ends with the shorter half).
    (An :class:`EpochHalves`: its ``state_dict`` is the position, for checkpoints.)"""
    return EpochHalves(n, batch_size, seed)


def _total(pm, task_loss: torch.Tensor, add_aux: bool) -> torch.Tensor:
    aux = pm.last_aux_losses if add_aux else {}
    return task_loss + sum(aux.values()) if aux else task_loss


def gate_learning_rate(config: SPTConfig, gate_steps: int) -> float:
    """``config.gate_lr``, or ``config.gate_travel / gate_steps`` when it is None."""
    if config.gate_lr is not None:
        return float(config.gate_lr)
    return config.gate_travel / max(1, gate_steps)


def warmup_steps(config: SPTConfig, steps: int) -> int:
    """The search steps, at its start, that skip the α step: ``round(gate_warmup * steps)``, leaving
    at least one gate step."""
    return min(round(config.gate_warmup * steps), max(0, steps - 1))


def search_optimizers(
    pm, head: nn.Module | None, lr: float, gate_lr: float, weight_decay: float = 0.0
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The two optimisers of the bi-level search: AdamW over ``ω`` (:func:`omega_parameters`, learning
    rate ``lr``) and Adam over ``α`` (:func:`alpha_parameters`, learning rate ``gate_lr``, betas
    ``(0.9, config.gate_beta2)``, no decay)."""
    beta2 = _spt(pm).config.gate_beta2
    opt_w = torch.optim.AdamW(omega_parameters(pm, head), lr=lr, weight_decay=weight_decay)
    opt_a = torch.optim.Adam(alpha_parameters(pm), lr=gate_lr, betas=(0.9, beta2))
    return opt_w, opt_a


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module | None):
    """Every submodule of ``modules`` in eval mode within the block (no dropout), modes restored after."""
    saved = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]
    for mod in modules:
        if mod is not None:
            mod.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def search(
    pm,
    head: nn.Module | None,
    d1_batches: Iterable,
    d2_batches: Iterable | None,
    steps: int,
    loss_fn: Callable[[Any, Any, Any], torch.Tensor],
    lr: float = 5e-3,
    gate_lr: float | None = None,
    weight_decay: float = 0.0,
    add_aux_losses: bool = True,
    record: SearchRecord | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None,
    start: int = 0,
) -> SearchRecord:
    """Bi-level gate search on the super-network (first-order DARTS; module docstring).

    Each of ``steps`` steps:

    1. ω step on the next D1 batch in training mode: ``loss_fn`` plus the consistency loss, one AdamW
       step of ``ω`` (generators, and ``head``). ``α`` is frozen; the consistency loss's masked run
       reads the gates through a copy of ``α`` (:meth:`SPT.harvest_consistency_gradient`), so the
       same backward gives ``∂ consistency / ∂α``.
    2. α step on the next D2 batch with every module of ``pm`` and ``head`` in eval mode (no dropout)
       and ``ω`` frozen: ``loss_fn`` (no consistency run); ``α`` gets its gradient plus the
       consistency gradient of step 1, then one Adam step with learning rate ``gate_lr`` (default
       :func:`gate_learning_rate`: ``config.gate_lr``, else ``config.gate_travel / gate steps``).
       The first :func:`warmup_steps` steps (``config.gate_warmup``) skip the α step.

    Args:
        pm: a PromptedModel with an SPT super-network (``selected_layers=None``).
        head: an extra trainable module trained with ``ω`` (e.g. a classifier) or None.
        d1_batches, d2_batches: iterables of batches (endless, or at least ``steps`` long); with
            ``d2_batches=None``, ``d1_batches`` yields ``(d1_batch, d2_batch)`` pairs (see
            :func:`epoch_halves`, which re-splits the data into halves each epoch).
        loss_fn: ``loss_fn(pm, head, batch) -> scalar`` task loss; ``pm.last_aux_losses`` (the
            consistency loss) is added to it unless ``add_aux_losses=False`` (use that if ``loss_fn``
            passes labels to a model that already adds them).
        progress: called as ``progress(step, omega_loss, alpha_loss)`` after each step.
        optimizers: ``(ω optimiser, α optimiser)`` to continue with (default :func:`search_optimizers`).
        start: the first step to run (a search resumed after ``start`` steps of ``steps``: the warmup
            and the default gate learning rate count from step 0); ``record`` and ``optimizers``
            should then be the ones saved with it, and the batches continue where it stopped.

    Returns the :class:`SearchRecord` (``record`` extended if given) with the gate trajectory and the
    gate learning rate.
    """
    method = _spt(pm)
    if method.discrete:
        raise ValueError("search needs the SPT super-network (selected_layers=None)")
    omega, alpha = omega_parameters(pm, head), alpha_parameters(pm)
    if optimizers is None:
        gate_lr = (
            gate_lr
            if gate_lr is not None
            else gate_learning_rate(method.config, steps - warmup_steps(method.config, steps))
        )
        opt_w, opt_a = search_optimizers(pm, head, lr, gate_lr, weight_decay)
    else:
        opt_w, opt_a = optimizers
        gate_lr = opt_a.param_groups[0]["lr"]
    record = record if record is not None else SearchRecord()
    record.gate_lr = float(gate_lr)
    warmup = warmup_steps(method.config, steps)
    if not record.gate_trajectory:
        record.gate_trajectory.append(method.gates().tolist())
    modes = [(m, m.training) for mod in (pm, head) if mod is not None for m in mod.modules()]
    if d2_batches is None:
        pairs = iter(d1_batches)
        it1 = it2 = None
    else:
        it1, it2 = iter(d1_batches), iter(d2_batches)
    try:
        for step in range(start, steps):
            if it1 is None:
                b1, b2 = next(pairs)
            else:
                b1, b2 = next(it1), next(it2)
            pm.train()
            if head is not None:
                head.train()
            with _frozen(alpha), method.harvest_consistency_gradient() as leaf:
                loss_w = _total(pm, loss_fn(pm, head, b1), add_aux_losses)
                opt_w.zero_grad(set_to_none=True)
                loss_w.backward()
                opt_w.step()
            consistency_grad = leaf.grad
            if step < warmup:
                record.search_steps += 1
                if progress is not None:
                    progress(step, loss_w.item(), float("nan"))
                continue
            with _frozen(omega), method.consistency(False), _eval_mode(pm, head):
                loss_a = _total(pm, loss_fn(pm, head, b2), add_aux_losses)
                opt_a.zero_grad(set_to_none=True)
                loss_a.backward()
                if consistency_grad is not None:
                    g = method.gate_logits.grad
                    method.gate_logits.grad = consistency_grad if g is None else g + consistency_grad
                opt_a.step()
            record.gate_trajectory.append(method.gates().tolist())
            record.search_steps += 1
            if progress is not None:
                progress(step, loss_w.item(), loss_a.item())
    finally:
        for m, mode in modes:
            m.training = mode
    return record


def select_layers(pm, k: int | None = None) -> list[int]:
    """The ``k`` (default ``config.budget_k``, capped at ``L``) layers with the largest ``a_l``, sorted
    (ties go to the lower layer)."""
    method = _spt(pm)
    if method.discrete:
        raise ValueError("select_layers needs the SPT super-network (selected_layers=None)")
    k = method.config.budget_k if k is None else k
    check_int("k", k)
    gates = method.gates().tolist()
    order = sorted(range(len(gates)), key=lambda i: (-gates[i], i))
    return sorted(order[: min(k, len(gates))])


def build_discrete(pm, layers: list[int], from_searched: bool | None = None):
    """The discrete model: detaches ``pm``'s super-network and attaches ``SPTConfig(selected_layers=layers)``
    (other fields unchanged) to the same base model. Its generators are the searched ones of
    ``layers`` (``from_searched``, default ``config.retrain_from == "searched"``) or freshly
    initialised (``"scratch"``). ``pm`` is unusable afterwards; returns the new PromptedModel (same
    train/eval mode)."""
    from prompt_kernels.patch.model import attach

    method = _spt(pm)
    if from_searched is None:
        from_searched = method.config.retrain_from == "searched"
    layers = sorted(set(layers))
    config = dataclasses.replace(pm.prompt_config, selected_layers=layers)
    keep = {str(v) for v in layers}
    state = {
        k: v.detach().clone()
        for k, v in method.state_dict().items()
        if k.startswith("generators.") and k.split(".")[1] in keep
    }
    training = method.training
    model = pm.detach()
    new = attach(model, config)
    if from_searched:
        new.method.load_state_dict(state, strict=True)
    new.train(training)
    return new


def retrain(
    pm,
    head: nn.Module | None,
    batches: Iterable,
    steps: int,
    loss_fn: Callable[[Any, Any, Any], torch.Tensor],
    lr: float = 5e-3,
    weight_decay: float = 0.0,
    add_aux_losses: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> torch.optim.Optimizer:
    """Train the discrete model's parameters (and ``head``) for ``steps`` steps of AdamW on ``batches``.
    ``optimizer`` defaults to AdamW over ``[*pm.prompt_parameters(), *head.parameters()]``. Returns it."""
    _spt(pm)
    if optimizer is None:
        params = [*pm.prompt_parameters(), *(head.parameters() if head is not None else ())]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    pm.train()
    if head is not None:
        head.train()
    it = iter(batches)
    for step in range(steps):
        loss = _total(pm, loss_fn(pm, head, next(it)), add_aux_losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    return optimizer


def search_and_retrain(
    pm,
    head,
    search_batches: Iterable,
    retrain_batches: Iterable,
    search_steps: int,
    retrain_steps: int,
    loss_fn,
    lr: float = 5e-3,
    gate_lr: float | None = None,
    k: int | None = None,
    out: str | None = None,
):
    """:func:`search` (``search_batches`` yields ``(D1, D2)`` pairs), :func:`select_layers`,
    :func:`build_discrete`, :func:`retrain`. Returns ``(discrete PromptedModel, SearchRecord, optimizer)``;
    with ``out``, saves the prompts (``config.selected_layers`` included) and ``spt_search.json`` there."""
    record = search(pm, head, search_batches, None, search_steps, loss_fn, lr=lr, gate_lr=gate_lr)
    record.selected_layers = select_layers(pm, k)
    record.retrain_from = pm.prompt_config.retrain_from
    discrete = build_discrete(pm, record.selected_layers)
    opt = retrain(discrete, head, retrain_batches, retrain_steps, loss_fn, lr=lr)
    record.retrain_steps = retrain_steps
    if out is not None:
        discrete.save_prompts(out)
        record.save(out)
    return discrete, record, opt


def cli_train(args, pm, head, tok, data, encode, forward, lr: float):
    """The pipeline of ``prompt-kernels train --method spt``, in one go (no checkpoints; the command
    line runs the same steps, bit for bit, checkpointed and resumable mid-search: ``_SPTSearch`` in
    ``prompt_kernels/train.py``, its retraining in the common training loop with batches
    ``BatchOrder(n, batch_size, seed + 1)``, which are this function's): search for ``max(1, steps // 2)`` steps (each an ω step on a
    D1 batch and an α step on a D2 batch; the gates' learning rate is ``config.gate_lr``, by default
    ``gate_travel / search steps``), keep the top ``budget_k`` layers, retrain the discrete model
    (from ``config.retrain_from``) for the remaining steps; writes ``spt_search.json`` to ``args.out``.
    Returns ``(discrete pm, optimizer)`` (the optimizer over ``[*pm.prompt_parameters(),
    *head.parameters()]``, as ``--resume`` expects)."""
    from tqdm.auto import tqdm

    search_steps = max(1, args.steps // 2)
    retrain_steps = args.steps - search_steps
    n = len(data.train_texts)

    def loss_fn(pm_, head_, idx):
        enc = encode(tok, [data.train_texts[i] for i in idx], args.max_length)
        labels = torch.tensor([data.train_labels[i] for i in idx])
        return F.cross_entropy(forward(pm_, head_, enc), labels)

    def plain_batches(seed):
        rng = random.Random(seed)
        bs = min(args.batch_size, n)
        while True:
            order = list(range(n))
            rng.shuffle(order)
            for i in range(0, n - bs + 1, bs):
                yield order[i : i + bs]

    bar = tqdm(total=args.steps, disable=args.no_progress, desc="spt", unit="step")

    def on_search(step, lw, la):
        bar.update(1)
        bar.set_postfix(phase="search", loss=f"{lw:.3f}", gate_loss=f"{la:.3f}")

    def on_retrain(step, loss):
        bar.update(1)
        bar.set_postfix(phase="retrain", loss=f"{loss:.3f}")

    record = search(
        pm,
        head,
        epoch_halves(n, args.batch_size, args.seed),
        None,
        search_steps,
        loss_fn,
        lr=lr,
        progress=on_search,
    )
    record.selected_layers = select_layers(pm)
    record.retrain_from = pm.prompt_config.retrain_from
    pm = build_discrete(pm, record.selected_layers)
    opt = retrain(pm, head, plain_batches(args.seed + 1), retrain_steps, loss_fn, lr=lr, progress=on_retrain)
    bar.close()
    record.retrain_steps = retrain_steps
    record.save(args.out)
    return pm, opt


__all__ = [
    "SPT",
    "EpochHalves",
    "SPTConfig",
    "SearchRecord",
    "alpha_parameters",
    "build_discrete",
    "classification_hidden",
    "cli_train",
    "epoch_halves",
    "gate_learning_rate",
    "head_representation",
    "omega_parameters",
    "propagate",
    "retrain",
    "search",
    "search_and_retrain",
    "search_optimizers",
    "select_layers",
    "warmup_steps",
]
