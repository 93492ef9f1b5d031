"""GPC: global prompt cell (Liu et al., NLPCC 2023). Sequence style from the input.

This is **our reading of the published abstract**: the paper describes a global prompt cell that
"selectively preserves prompt information across all encoder layers" with remember/forget gates;
we implement it as one LSTM-like cell shared by all layers that rewrites the prompt rows between
every pair of layers (METHODS.md, "GPC").

Shapes (``B`` batch, ``p`` prompt length, ``d`` hidden size, ``L`` layers, layers indexed ``0 .. L-1``)::

    P^0      [p, d]        soft prompt (parameter ``prompt``), inserted in front of the hidden states
                           entering layer 0 (``sequence_init``); the cell state starts as c = P^0
    h        [B, p, d]     the prompt rows output by layer l
    f, i, o  [B, p, d]     σ(W_f [h; c] + b_f), σ(W_i [h; c] + b_i), σ(W_o [h; c] + b_o)
    c'       [B, p, d]     f * c + i * tanh(W_c h + b_c)        (the new cell state)
    rows     [B, p, d]     o * tanh(c')  -> the prompt rows entering layer l + 1

The cell runs after layers ``0 .. L-2`` (after the last layer the rows are removed, so it is not
run). The cell state lives in the per-forward ``ctx.cache`` and is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig, check_float, check_int, register_config
from prompt_kernels.methods.base import PromptMethod, register_method

_STATE = "gpc_cell_state"


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
        keeping its state). ``P^0`` starts normal with the standard deviation of the vocabulary
        embeddings (as ``PromptTuningConfig(init="random")``).
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
        std = float(info.input_embeddings.weight.detach().float().std())
        self.prompt = nn.Parameter(torch.randn(config.prompt_length, d, device=dev) * std)
        self.forget_gate = _cell_linear(2 * d, d, r, dev)
        self.input_gate = _cell_linear(2 * d, d, r, dev)
        self.output_gate = _cell_linear(2 * d, d, r, dev)
        self.candidate = _cell_linear(d, d, r, dev)
        with torch.no_grad():
            _bias(self.forget_gate).fill_(config.forget_bias)
            for gate in (self.input_gate, self.output_gate, self.candidate):
                _bias(gate).zero_()

    def cell(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``h [B, p, d]``, ``c [B|1, p, d]`` -> (rows ``o * tanh(c')``, new state ``c'``), float32."""
        h = h.float()
        hc = torch.cat([h, c.expand_as(h)], dim=-1)
        f = torch.sigmoid(self.forget_gate(hc))
        i = torch.sigmoid(self.input_gate(hc))
        o = torch.sigmoid(self.output_gate(hc))
        c_new = f * c + i * torch.tanh(self.candidate(h))
        return o * torch.tanh(c_new), c_new

    def sequence_init(self, ctx):
        ctx.cache[_STATE] = self.prompt[None]
        return self.prompt[None]

    def sequence_update(self, ctx, layer_idx, rows):
        if layer_idx == self.info.num_layers - 1:
            return rows  # the rows are removed after the last layer: no next layer to feed
        new_rows, ctx.cache[_STATE] = self.cell(rows, ctx.cache[_STATE])
        return new_rows.to(rows.dtype)


__all__ = ["GPC", "GPCConfig"]
