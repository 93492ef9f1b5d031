"""GPC: global prompt cell (Liu et al., NLPCC 2023). Sequence style from the input.

This is **our reading of the published abstract**: the paper describes a global prompt cell that
"selectively preserves prompt information across all encoder layers" with remember/forget gates;
we implement it as one LSTM-like cell shared by all layers that rewrites the prompt rows between
every pair of layers (METHODS.md, "GPC").

Shapes (``B`` batch, ``p`` prompt length, ``d`` hidden size, ``L`` layers, layers indexed ``0 .. L-1``)::

    P^       [p, d]        soft prompt (parameter ``prompt``), rows of unit RMS at initialisation
    s_0      [B, 1, 1]     sg(mean over the real tokens entering layer 0 of their RMS): the token scale
    P^0      [B, p, d]     s_0 * P^, inserted in front of the hidden states entering layer 0
                           (``sequence_init``); the cell state starts as c_0 = P^ (the unit-scale prompt)
    h        [B, p, d]     the prompt rows output by layer l;  s = sg(RMS of each row of h)  [B, p, 1]
    h^       [B, p, d]     h / s   (the cell works at unit scale)
    f, i, o  [B, p, d]     σ(W_f [h^; c] + b_f), σ(W_i [h^; c] + b_i), σ(W_o [h^; c] + b_o)
    c'       [B, p, d]     f * c + i * tanh(W_c h^ + b_c)        (the new cell state)
    y        [B, p, d]     o * tanh(c')
    rows     [B, p, d]     s * y / RMS(y)  -> the prompt rows entering layer l + 1

Scales (our choice; METHODS.md writes the rows as ``o * tanh(c)``). The rows live among hidden states
whose scale the model sets (after BERT's embedding LayerNorm a token has RMS ~0.6 and norm ~12 in
MiniLM; a vocabulary row has norm ~1.1), while ``o * tanh(c)`` is bounded in (-1, 1) and a prompt
initialised like a vocabulary row would be ~10 times smaller than the tokens it sits among. So the
inserted prompt is ``P^`` times the measured token scale, the cell reads the rows divided by their own
RMS, and its output ``o * tanh(c')`` (which decides the rows' direction, feature by feature) is
rescaled to the RMS the rows had when layer ``l`` output them. At initialisation and after training,
the rows entering every layer are on the scale of the hidden states around them.

The cell runs after layers ``0 .. L-2`` (after the last layer the rows are removed, so it is not
run). The cell state lives in the per-forward ``ctx.cache`` and is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prompt_kernels.configs import PromptConfig, check_float, check_int, register_config
from prompt_kernels.methods.base import PromptMethod, register_method

_STATE = "gpc_cell_state"
_EPS = 1e-6


def rms(x: torch.Tensor) -> torch.Tensor:
    """The root mean square over the last dimension, keeping it: ``[..., d] -> [..., 1]``."""
    return x.square().mean(-1, keepdim=True).sqrt()


def token_scale(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]``: the mean RMS of the real tokens of ``hidden [B, T, d]`` (mask ``[B, T]``), detached;
    1 for a row without real tokens."""
    r = rms(hidden.detach().float()).squeeze(-1)  # [B, T]
    m = mask.to(r.dtype)
    n = m.sum(1)
    scale = (r * m).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, scale, torch.ones_like(scale)).clamp_min(_EPS)[:, None, None]


@register_config
@dataclass
class GPCConfig(PromptConfig):
    """GPC (METHODS.md; our reading of the abstract, see ``prompt_kernels.methods.gpc``).

    prompt_length: ``p``, the soft prompt rows ``P^0`` inserted before layer 0.
    rank: ``r`` of the low-rank cell weights (each ``W_x = U_x V_x``: ``in -> r -> d``, the bias on
        the ``r -> d`` side). 64 (default). None = full-rank weights (``W_f, W_i, W_o: [d, 2d]``,
        ``W_c: [d, d]``).
    forget_bias: initial value of ``b_f``; ``b_i``, ``b_o``, ``b_c`` start at 0 and the weights
        at PyTorch's default ``Linear`` init. 1.0 (the usual LSTM choice: the cell starts by mostly
        keeping its state). ``P^`` starts as standard normal rows rescaled to RMS 1 (the inserted rows
        are ``P^`` times the token scale, see the module docstring).
    """

    method: ClassVar[str] = "gpc"
    rank: int | None = 64
    forget_bias: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None:
            check_int("rank", self.rank)
        check_float("forget_bias", self.forget_bias)


def _cell_linear(in_features: int, out_features: int, rank: int | None, device) -> nn.Module:
    """``Linear(in, out)``, or ``Linear(in, r, bias=False) -> Linear(r, out)`` when ``rank`` is set."""
    if rank is None:
        return nn.Linear(in_features, out_features, device=device)
    return nn.Sequential(
        nn.Linear(in_features, rank, bias=False, device=device), nn.Linear(rank, out_features, device=device)
    )


def _gate(layer: nn.Module, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``layer([h; c])`` without concatenating: the first linear map's weight ``[out, 2d]`` is applied as
    its two column blocks, ``W[:, :d] h + W[:, d:] c`` (``c`` may be ``[1, p, d]``: its part is computed
    once and broadcast over the batch)."""
    first = layer if isinstance(layer, nn.Linear) else layer[0]
    d = h.shape[-1]
    out = F.linear(h, first.weight[:, :d]) + F.linear(c, first.weight[:, d:], first.bias)
    return out if first is layer else layer[1](out)


def _bias(layer: nn.Module) -> torch.Tensor:
    return (layer if isinstance(layer, nn.Linear) else layer[-1]).bias


@register_method(GPCConfig)
class GPC(PromptMethod):
    """Soft prompt ``P^0`` plus one global prompt cell shared by all layers.

    Trainable parameters (``r`` = rank)::

        full rank:  p d + 3 (2d d + d) + (d d + d)
        low rank:   p d + 3 (2d r + r d + d) + (d r + r d + d)

    Submodules ``forget_gate``, ``input_gate``, ``output_gate`` (read ``[h; c]``, ``2d``) and
    ``candidate`` (reads ``h``, ``d``); each a ``Linear`` or a ``Sequential(down, up)``.
    """

    sequence_layer = 0

    def __init__(self, config: GPCConfig, info, **options):
        super().__init__(config, info)
        d, r, dev = info.hidden_size, config.rank, info.device
        prompt = torch.randn(config.prompt_length, d, device=dev)
        self.prompt = nn.Parameter(prompt / rms(prompt))
        self.forget_gate = _cell_linear(2 * d, d, r, dev)
        self.input_gate = _cell_linear(2 * d, d, r, dev)
        self.output_gate = _cell_linear(2 * d, d, r, dev)
        self.candidate = _cell_linear(d, d, r, dev)
        with torch.no_grad():
            _bias(self.forget_gate).fill_(config.forget_bias)
            for gate in (self.input_gate, self.output_gate, self.candidate):
                _bias(gate).zero_()

    def cell(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at unit scale: ``h [B, p, d]`` (rows divided by their RMS), ``c [B|1, p, d]`` ->
        (``y = o * tanh(c')``, new state ``c'``), float32."""
        h = h.float()
        f = torch.sigmoid(_gate(self.forget_gate, h, c))
        i = torch.sigmoid(_gate(self.input_gate, h, c))
        o = torch.sigmoid(_gate(self.output_gate, h, c))
        c_new = f * c + i * torch.tanh(self.candidate(h))
        return o * torch.tanh(c_new), c_new

    def sequence_init(self, ctx):
        ctx.cache[_STATE] = self.prompt[None]
        scale = token_scale(ctx.layer_input(0, real_only=True), ctx.attention_mask)
        return scale * self.prompt[None]

    def sequence_update(self, ctx, layer_idx, rows):
        if layer_idx == self.info.num_layers - 1:
            return rows  # the rows are removed after the last layer: no next layer to feed
        h = rows.float()
        scale = rms(h.detach()).clamp_min(_EPS)
        y, ctx.cache[_STATE] = self.cell(h / scale, ctx.cache[_STATE])
        return (scale * y / (rms(y) + _EPS)).to(rows.dtype)


__all__ = ["GPC", "GPCConfig", "rms", "token_scale"]
