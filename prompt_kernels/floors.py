"""Byte and flop floors of every op: the least global-memory traffic (each input read once, each
output written once) and the fewest flops of one call, for the roofline report and the launch cases.

Plain Python (and torch dtypes' element sizes), importing no other module of the package: the ops,
the Triton kernels' launch cases (which the tools run) and the tools can all import it, so that the
kernels never need the ops (the ops import the kernels). Each ops module re-exports its op's floors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# ----------------------------------------------------------------------------------------------
# gated_prefix_attention


def visible_key_pairs(T: int, S: int, is_causal: bool) -> int:
    """Number of (query, key) pairs among the S keys that attention reads: T * S, or with bottom-right
    causality sum_t clamp(t + S - T + 1, 0, S)."""
    if not is_causal:
        return T * S
    d = S - T
    if d >= 0:
        return T * (d + 1) + T * (T - 1) // 2
    return S * (S + 1) // 2


def gated_prefix_attention_floors(
    B: int,
    H: int,
    Hkv: int,
    T: int,
    S: int,
    P: int,
    Dh: int,
    *,
    dtype: torch.dtype = torch.float32,
    prompt_batch: int = 1,
    gate_numel: int = 1,
    gate_dtype: torch.dtype = torch.float32,
    mask: str = "none",
    mask_heads: int = 1,
    is_causal: bool = False,
) -> dict[str, dict[str, int]]:
    """Byte and flop floors of one call: each input read once, each output written once.

    Forward reads q, k, v, prompt_key, prompt_value, gate and the mask (``"none"``, ``"bool"`` [B, S]
    or ``"additive"`` [B, mask_heads, T, S] in ``dtype``) and writes out plus the float32
    log-sum-exp [B, H, T] the backward needs. Flops: two matmuls (q.k and p.v), 4 * Dh per visible
    (query, key) pair, the P prompt keys always visible. Backward reads the forward's inputs, out,
    grad_out and lse, writes dq, dk, dv, dprompt_key, dprompt_value and dgate; 5 matmuls, 2.5x the
    forward's flops (the recomputation of q.k counted once).
    """
    es = torch.empty((), dtype=dtype).element_size()
    gs = torch.empty((), dtype=gate_dtype).element_size()
    q = B * H * T * Dh * es
    kv = 2 * B * Hkv * S * Dh * es
    pkv = 2 * prompt_batch * Hkv * P * Dh * es
    g = gate_numel * gs
    mask_bytes = {"none": 0, "bool": B * S, "additive": B * mask_heads * T * S * es}[mask]
    lse = B * H * T * 4
    pairs = T * P + visible_key_pairs(T, S, is_causal)
    fwd_flops = 4 * B * H * Dh * pairs
    return {
        "forward": {"bytes": q + kv + pkv + g + mask_bytes + q + lse, "flops": fwd_flops},
        "backward": {
            "bytes": (q + kv + pkv + g + mask_bytes + 2 * q + lse) + (q + kv + pkv + g),
            "flops": fwd_flops * 5 // 2,
        },
    }


# ----------------------------------------------------------------------------------------------
# phm_linear


class PhmLinearFloors(NamedTuple):
    """Least bytes moved and flops of one call (each input read once, each output written once)."""

    forward_bytes: int
    forward_flops: int
    backward_bytes: int
    backward_flops: int
    kron_build_flops: int  # building H once: 2 * n * in * out (n^3 * I * O multiply-adds)


def phm_linear_floors(
    rows: int, in_features: int, out_features: int, n: int, element_size: int, bias: bool = True
):
    """Floors for ``x: [rows, in_features] -> [rows, out_features]``.

    Forward reads x, rules, weights, bias and writes y; its flops are those of the dense equivalent,
    ``2 * rows * in * out`` (the Kronecker structure does not lower them: ``y_b = sum_i (sum_a
    rules[i,a,b] x_a) W_i`` is still ``n^2`` GEMMs of ``rows x I x O``), plus ``rows * out`` for the bias.
    Backward reads dy, x, rules, weights and writes dx, drules, dweights, dbias: ``dx = dy @ H^T`` and
    ``dH = x^T dy`` are ``2 * rows * in * out`` each; the reductions of ``dH`` onto ``weights`` and
    ``rules`` are ``2 * n * in * out`` each and ``dbias`` is ``rows * out``.
    """
    params = n**3 + in_features * out_features // n + (out_features if bias else 0)
    fwd_bytes = element_size * (rows * in_features + params + rows * out_features)
    fwd_flops = 2 * rows * in_features * out_features + (rows * out_features if bias else 0)
    bwd_bytes = element_size * (
        2 * rows * out_features + 2 * rows * in_features + 2 * params - (out_features if bias else 0)
    )
    bwd_flops = 4 * rows * in_features * out_features + 4 * n * in_features * out_features
    bwd_flops += rows * out_features if bias else 0
    return PhmLinearFloors(fwd_bytes, fwd_flops, bwd_bytes, bwd_flops, 2 * n * in_features * out_features)


# ----------------------------------------------------------------------------------------------
# prompt_pool


def _bin_widths_sum(n: int, length: int) -> int:
    """sum_j (e_j - s_j): how many (token, bin) memberships a row of n real tokens has."""
    return sum(-(-((j + 1) * n) // length) - (j * n) // length for j in range(length))


def prompt_pool_floors(
    B: int,
    T: int,
    D: int,
    length: int,
    *,
    dtype: torch.dtype = torch.float32,
    mask_dtype: torch.dtype | None = torch.bool,
    n_real: int | None = None,
) -> dict[str, dict[str, int]]:
    """Byte and flop floors: each input read once, each output written once, the fewest flops.

    ``n_real`` is the number of real tokens per row (default ``T``). Forward: read x and the mask,
    write out; one add (or the final scale) per (token, bin) membership and feature. Backward: read
    grad_out and the mask, write grad_x; one multiply-add per membership and feature.
    """
    es = torch.empty((), dtype=dtype).element_size()
    ms = 0 if mask_dtype is None else torch.empty((), dtype=mask_dtype).element_size()
    n = T if n_real is None else n_real
    memberships = B * _bin_widths_sum(n, length)
    fwd_bytes = B * T * D * es + B * T * ms + B * length * D * es
    bwd_bytes = B * length * D * es + B * T * ms + B * T * D * es
    return {
        "forward": {"bytes": fwd_bytes, "flops": memberships * D},
        "backward": {"bytes": bwd_bytes, "flops": 2 * memberships * D},
    }


# ----------------------------------------------------------------------------------------------
# vq_nearest, vq_quantize, vq_sample


class VQFloors(NamedTuple):
    """Least bytes moved and flops of one call (each input read once, each output written once)."""

    forward_bytes: int
    forward_flops: int
    backward_bytes: int
    backward_flops: int


def vq_nearest_floors(rows: int, codes: int, dim: int, element_size: int) -> VQFloors:
    """``vq_nearest``: read x ``[N, D]`` and the codebook ``[K, D]``, write int64 indices and float32
    distances; ``2 N K D`` flops for the products (the norms and the minimum are lower order).
    Not differentiable: no backward."""
    fwd_bytes = element_size * (rows * dim + codes * dim) + rows * (8 + 4)
    return VQFloors(fwd_bytes, 2 * rows * codes * dim, 0, 0)


def vq_quantize_floors(rows: int, codes: int, dim: int, element_size: int) -> VQFloors:
    """``vq_quantize``: read x ``[N, D]`` and the codebook, write ``quantized`` ``[N, D]``, int64
    indices and the scalar loss (the winning rows are part of the codebook read once). Flops: the
    lookup's ``2 N K D`` plus ``3 N D`` for the loss. Backward: read ``dq``, x and ``quantized``
    (``[N, D]`` each), write dx: ``dx = dq + (2 w / (N D)) (x - q) dloss``, ``4 N D`` flops (the
    straight-through itself adds nothing)."""
    fwd = vq_nearest_floors(rows, codes, dim, element_size)
    fwd_bytes = fwd.forward_bytes - rows * 4 + element_size * (rows * dim + 1)
    return VQFloors(
        fwd_bytes, fwd.forward_flops + 3 * rows * dim, element_size * 4 * rows * dim, 4 * rows * dim
    )


def vq_sample_floors(rows: int, codes: int, dim: int, num_samples: int, element_size: int) -> VQFloors:
    """``vq_sample``: read x and the codebook, write ``[N, S]`` int64 indices, ``quantized`` and the
    loss. Flops: ``2 N K D`` products, plus the mean of ``S`` codes (``N S D``) and the loss
    (``3 N D``); the ``N S K`` (Gumbel) or ``N K`` (inverse CDF) sampling work is not counted as
    flops. Backward as for ``vq_quantize``."""
    fwd_bytes = element_size * (rows * dim + codes * dim + rows * dim + 1) + rows * num_samples * 8
    fwd_flops = 2 * rows * codes * dim + rows * num_samples * dim + 3 * rows * dim
    return VQFloors(fwd_bytes, fwd_flops, element_size * 4 * rows * dim, 4 * rows * dim)
