"""Triton kernels of ``phm_linear``: ``y = x @ H + bias``, ``H = sum_i kron(rules[i], weights[i])``.

    x: [N, n*I] (any strides)   rules: [n, n, n]   weights: [n, I, O]   bias: [n*O]   y: [N, n*O]

``H[a*I + p, b*O + q] = sum_i rules[i, a, b] * weights[i, p, q]`` is never stored: each program
builds the ``H`` chunk it needs in registers (fp32, from ``rules`` and ``weights`` tiles, then rounded
to the input dtype as a materialised ``H`` would be) right before the ``tl.dot`` that consumes it.
``x`` is read in place through its strides.

* ``_forward_kernel`` (grid ``(cdiv(N, BLOCK_M), cdiv(O, BLOCK_N // N_UNROLL))``): every Kronecker
  block side by side in one tile (``_kron_mm``, ``N_UNROLL = next_pow2(n)``): the tile's
  ``BLOCK_N`` columns are ``(b, q)`` for all ``b`` and a chunk of ``q``, its ``BLOCK_K`` reduction
  lanes ``(a, p)`` for all ``a`` and a chunk of ``p``, so a single loop over ``p`` does
  ``acc += x[rows, (a, p)] @ H[(a, p), (b, q)]``: each program reads its rows of ``x`` once (once in
  all when ``N_UNROLL * O <= 64``), ``weights`` once and ``rules`` once; add the bias, store once.
* ``_grad_x_kernel`` (grid ``(cdiv(N, BLOCK_M), cdiv(I, BLOCK_N // N_UNROLL))``): ``dx = dy @ H^T``
  the same way, the ``H^T`` chunk built from transposed ``weights`` tiles.
* The parameter gradients (``grad_params``), deterministic: no atomics, every sum in a fixed order.

  1. ``_grad_h_kernel`` (grid ``(cdiv(I, BLOCK_P // N_POW2), cdiv(O, BLOCK_Q // N_POW2), splits)``):
     the GEMM ``dH = x^T dy`` (``tl.dot``, fp32) on tiles of every block at once (rows ``(a, p)``,
     columns ``(b, q)``, ``N_POW2 = next_pow2(n)`` blocks a side), split over rows (split-K) when the
     tiles alone would not fill the GPU, then contracted in registers: ``dweights[i, p, q] =
     sum_ab rules[i, a, b] dH_ab[p, q]`` for all ``i``, the tile's share of ``drules[i, a, b] =
     <weights[i], dH_ab>`` (to ``drp [splits * tiles, n^3]``) and, in the first p-tile, the column
     sums of ``dy`` (``dbias``). No ``dH`` workspace: with one split ``dweights`` and ``dbias`` are
     stored in place, once; with several, each split's fp32 partials to its own slot (no atomics).
  2. ``_grad_reduce_kernel`` (grid ``1 + blocks``): program 0 sums the ``drules`` shares in order;
     with several splits the others sum the partials of ``dweights`` and ``dbias`` in split order.

The forward and grad_x loops are single loops (no inner loop), so Triton pipelines their loads
(cp.async, ``num_stages = 2``); fp16/bf16 only where the launcher has checked 16-byte alignment
(``mm_align``: ``ALIGN = 8``, passed to the kernel so that it knows I and O are multiples of 8),
else ``num_stages = 1`` (2-byte loads cannot be asynchronous copies). n > 16 is not taken (the op
runs PyTorch).

All accumulation is fp32; fp32 dots use ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prompt_kernels import _alloc
from prompt_kernels.kernels.registry import (
    DEFAULT_ARCH,
    TABLE_ARCHS,
    CompileSpec,
    LaunchCase,
    TileConfig,
    TunedKernel,
    arch_row,
    launch_arch,
    register_compile_specs,
    register_launch_cases,
)

OP = "phm_linear"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

BLOCK_M = 64  # rows per program (forward, grad_x) for fp16/bf16: wgmma's 64-row tile on sm_90
# fp32 (IEEE dots on the FMA units): 32 rows. With 64, the all-blocks tiles of n = 4 need 255
# registers and spill 8-44 B (BLOCK_N = 64, and BLOCK_K = 32) on sm_90, some on sm_80.
BLOCK_M_FP32 = 32
# (BLOCK_N, BLOCK_K) of the forward and grad_x kernels: output columns per program (q for forward,
# p for grad_x) and reduction chunk (p for forward, q for grad_x). (64, 32) is left out: it spills on sm_80.
MM_CONFIGS = ((16, 16), (16, 32), (32, 16), (32, 32), (64, 16))
# tile sides of the dH = x^T dy GEMM (BLOCK_P over (a, p), BLOCK_Q over (b, q): every block at once)
GRAD_H_TILES = (32, 64)
BLOCK_R = 32  # rows per step of the dH GEMM's reduction
REDUCE_BLOCK = 1024  # elements per program of the sum over the splits' partial dweights / dbias
WORKSPACE_SHARE = 4  # the split partials' round trip: at most 1/4 of the bytes of x and dy
NUM_WARPS = 4
NUM_STAGES = 2


MAX_N_POW2 = 16  # largest next_pow2(n) whose blocks all fit one tile (BLOCK_N, BLOCK_K >= 16)
HALF_ALIGN = 8  # fp16/bf16: elements per 16-byte vector (the ALIGN hint when the launcher checked it)


def mm_unroll(dtype: torch.dtype, n: int) -> int:
    """``N_UNROLL`` of the forward and grad_x launches (any dtype): ``next_pow2(n)``, the Kronecker
    blocks held side by side in one tile (``_kron_mm``: ``N_UNROLL`` column blocks of ``BLOCK_N`` and
    ``N_UNROLL`` reduction blocks of ``BLOCK_K``), so that each program reads its rows of ``x`` once
    and its single reduction loop (no inner loop) is pipelined (cp.async). At most ``MAX_N_POW2``
    (``ops.phm_linear.TRITON_MAX_N``: larger n runs PyTorch)."""
    if not 1 <= n <= MAX_N_POW2:
        raise ValueError(f"phm_linear (triton): n must be in [1, {MAX_N_POW2}], got {n}")
    return triton.next_power_of_2(int(n))


def mm_align(t: torch.Tensor, weights: torch.Tensor, *extents: int) -> int:
    """The ``ALIGN`` hint (elements) of a forward / grad_x launch reading ``t`` (rows of ``n`` blocks
    of ``extents[0]`` features) and ``weights`` (``[n, I, O]``): fp16/bf16 ``HALF_ALIGN`` when ``t``'s
    base and row stride and ``I``, ``O`` are multiples of 16 bytes and its features contiguous, so that
    every load of the reduction loop is a 16-byte vector and cp.async; else 1. fp32 always 1 (4-byte
    cp.async needs no alignment; fp32 is not the tensor-core path)."""
    if t.dtype == torch.float32 or t.stride(1) != 1:
        return 1
    if any((u.data_ptr() // u.element_size()) % HALF_ALIGN for u in (t, weights)):
        return 1
    if t.shape[0] > 1 and t.stride(0) % HALF_ALIGN:
        return 1
    return HALF_ALIGN if all(e % HALF_ALIGN == 0 for e in extents) else 1


DOT_PRECISION = "ieee"  # only affects fp32 dots: exact fp32 products, no TF32
# ``n`` values compiled by the compile check: the launch cases' n = 4 (also PromptGenerator's default)
# and n = 2. ``N_UNROLL`` (next power of two of n) of the forward and grad_x kernels, ``N_POW2`` (the
# same) of the contraction kernel and ``BLOCK`` (of n^3) of the drules kernel follow n, so the JIT
# compiles one specialisation per such value launched; others (n = 1, 3, 8, ...) are compiled by the
# JIT on first use on a GPU, not by the compile check.
COMPILE_N = (4, 2)


@triton.jit
def _kron_mm(
    in_ptr, r_ptr, w_ptr, N, n, KD, CD, stride_im, stride_ik, rows, u0,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NP: tl.constexpr,
    ALIGN: tl.constexpr, TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``in[rows, :] @ M`` on the columns ``(c, u0 + [0, BLOCK_N // NP))`` of every block ``c < n``:
    ``M = H`` (forward: ``k = a``, ``v = p``, ``c = b``, ``u = q``, ``KD = I``, ``CD = O``) or ``H^T``
    (``TRANSPOSED``, grad_x: ``k = b``, ``v = q``, ``c = a``, ``u = p``, ``KD = O``, ``CD = I``).

    The tile's ``BLOCK_K`` reduction lanes are ``NP`` blocks ``k`` of ``BLOCK_K // NP`` features ``v``
    and its ``BLOCK_N`` columns ``NP`` blocks ``c`` of ``BLOCK_N // NP`` features ``u``, so one dot
    step covers every Kronecker block at once: each element of ``in`` is read once per program, each
    of ``weights`` once per step (``[NP, BK, BN]``, all ``i``), ``rules`` once per program. The ``M``
    chunk ``sum_i R_i[k, c] * W_i[v, u]`` is built in fp32 as ``[NP, BK, NP, BN]`` and rounded to the
    input dtype as a materialised ``H`` would be. ``ALIGN`` (elements) is a multiple the launcher has
    checked for ``KD``, ``CD`` and ``stride_im`` (``stride_ik == 1``): vector loads, cp.async."""
    BK: tl.constexpr = BLOCK_K // NP
    BN: tl.constexpr = BLOCK_N // NP
    # no-ops (the launcher checked the multiples) that tell the compiler so: vector loads and masks
    KD = KD // ALIGN * ALIGN
    CD = CD // ALIGN * ALIGN
    stride_im = stride_im // ALIGN * ALIGN
    IO = KD * CD
    # rules as R[i, k, c] (fp32, [NP, NP, NP]), read once
    i1 = tl.arange(0, NP)
    i3 = i1[:, None, None]
    k3 = i1[None, :, None]
    c3 = i1[None, None, :]
    if TRANSPOSED:
        r_offs = (i3 * n + c3) * n + k3
    else:
        r_offs = (i3 * n + k3) * n + c3
    r3 = tl.load(r_ptr + r_offs, mask=(i3 < n) & (k3 < n) & (c3 < n), other=0.0).to(tl.float32)
    r5 = r3[:, :, None, :, None]
    kk = tl.arange(0, BLOCK_K)
    k_blk = kk // BK
    k_in = kk % BK
    k_ok = k_blk < n
    k_base = k_blk * KD
    row_ok = rows < N
    in_rows = in_ptr + (rows.to(tl.int64) * stride_im)[:, None]
    v_in = tl.arange(0, BK)
    u = u0 + tl.arange(0, BN)
    u_ok = u < CD
    iw = i1[:, None, None] * IO
    iw_ok = i1[:, None, None] < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for v0 in range(0, KD, BK):
        v = v0 + k_in
        x_mask = row_ok[:, None] & (k_ok & (v < KD))[None, :]
        xt = tl.load(in_rows + ((k_base + v).to(tl.int64) * stride_ik)[None, :], mask=x_mask, other=0.0)
        vv = v0 + v_in
        w_mask = iw_ok & (vv < KD)[None, :, None] & u_ok[None, None, :]
        if TRANSPOSED:  # W_i[v = q, u = p] = weights[i, p, q]
            w_offs = iw + vv[None, :, None] + (u * KD)[None, None, :]
        else:  # W_i[v = p, u = q] = weights[i, p, q]
            w_offs = iw + (vv * CD)[None, :, None] + u[None, None, :]
        w3 = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        h4 = tl.sum(r5 * w3[:, None, :, None, :], axis=0)  # [NP (k), BK (v), NP (c), BN (u)]
        h = tl.reshape(h4, (BLOCK_K, BLOCK_N))
        acc = tl.dot(xt, h.to(xt.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _forward_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    n,
    I,
    O,
    has_bias,
    stride_xm,
    stride_xk,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    N_UNROLL: tl.constexpr,
    ALIGN: tl.constexpr = 1,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # every block b at once: columns (b, q0 + [0, BLOCK_N // N_UNROLL))
    BN: tl.constexpr = BLOCK_N // N_UNROLL
    q0 = pid_n * BN
    acc = _kron_mm(x_ptr, r_ptr, w_ptr, N, n, I, O, stride_xm, stride_xk, rows, q0,
                   BLOCK_M, BLOCK_N, BLOCK_K, N_UNROLL, ALIGN, False, DOT_PRECISION)  # fmt: skip
    cc = tl.arange(0, BLOCK_N)
    b = cc // BN
    q = q0 + cc % BN
    col_ok = (b < n) & (q < O)
    cols = b * O + q
    if has_bias != 0:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows < N)[:, None] & col_ok[None, :])


@triton.jit
def _grad_x_kernel(
    dy_ptr,
    r_ptr,
    w_ptr,
    dx_ptr,
    N,
    n,
    I,
    O,
    stride_dym,
    stride_dyk,
    stride_dxm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    N_UNROLL: tl.constexpr,
    ALIGN: tl.constexpr = 1,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # every block a at once: columns (a, p0 + [0, BLOCK_N // N_UNROLL))
    BN: tl.constexpr = BLOCK_N // N_UNROLL
    p0 = pid_n * BN
    acc = _kron_mm(dy_ptr, r_ptr, w_ptr, N, n, O, I, stride_dym, stride_dyk, rows, p0,
                   BLOCK_M, BLOCK_N, BLOCK_K, N_UNROLL, ALIGN, True, DOT_PRECISION)  # fmt: skip
    cc = tl.arange(0, BLOCK_N)
    a = cc // BN
    p = p0 + cc % BN
    col_ok = (a < n) & (p < I)
    cols = a * I + p
    dx = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(rows < N)[:, None] & col_ok[None, :])


@triton.jit
def _grad_h_kernel(
    x_ptr,
    dy_ptr,
    r_ptr,
    w_ptr,
    dw_ptr,
    db_ptr,
    dwp_ptr,
    dbp_ptr,
    drp_ptr,
    N,
    n,
    I,
    O,
    rows_per_split,
    splits,
    want_params,
    want_bias,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyk,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_POW2: tl.constexpr,
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program ``(tp, tq, s)``: the ``dH`` GEMM over the rows of split ``s`` on the features
    ``p`` in the ``tp``-th chunk of ``BP = BLOCK_P // N_POW2`` and ``q`` in the ``tq``-th chunk of
    ``BQ = BLOCK_Q // N_POW2`` of every block at once (tile rows ``(a, p)``, columns ``(b, q)``):
    ``G[a, p, b, q] = sum_r x[r, a*I + p] dy[r, b*O + q]`` (``tl.dot``, fp32), then contracted in
    registers (no ``dH`` workspace): ``dweights[i, p, q] = sum_ab rules[i, a, b] G[a, p, b, q]``
    and the tile's share ``drp[s, tile, i, a, b] = sum_pq weights[i, p, q] G[a, p, b, q]``; the
    ``tp = 0`` programs also the column sums of ``dy`` (``dbias``). One split: ``dweights`` and
    ``dbias`` stored in place (``dw``, ``db``); several: the split's fp32 partials to ``dwp[s]``,
    ``dbp[s]`` (summed by ``_grad_reduce_kernel``). No atomics; every sum in a fixed order."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2)
    # no-ops (the launcher checked the multiples) that tell the compiler so: vector loads and masks
    I = I // ALIGN * ALIGN
    O = O // ALIGN * ALIGN
    stride_xm = stride_xm // ALIGN * ALIGN
    stride_dym = stride_dym // ALIGN * ALIGN
    BP: tl.constexpr = BLOCK_P // N_POW2
    BQ: tl.constexpr = BLOCK_Q // N_POW2
    p0 = pid_p * BP
    q0 = pid_q * BQ
    pp = tl.arange(0, BLOCK_P)
    a_blk = pp // BP
    p = p0 + pp % BP
    p_ok = (a_blk < n) & (p < I)
    qq = tl.arange(0, BLOCK_Q)
    b_blk = qq // BQ
    q = q0 + qq % BQ
    q_ok = (b_blk < n) & (q < O)
    x_cols = x_ptr + ((a_blk * I + p).to(tl.int64) * stride_xk)[:, None]
    dy_cols = dy_ptr + ((b_blk * O + q).to(tl.int64) * stride_dyk)[None, :]
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, N)
    g = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = r < r_end
        x_offs = (r * stride_xm)[None, :]
        xt = tl.load(x_cols + x_offs, mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        dy_offs = (r * stride_dym)[:, None]
        dyt = tl.load(dy_cols + dy_offs, mask=r_ok[:, None] & q_ok[None, :], other=0.0)
        g = tl.dot(xt, dyt, g, input_precision=DOT_PRECISION)
        dbias += tl.sum(dyt.to(tl.float32), axis=0)
    if want_params != 0:
        g4 = tl.reshape(g, (N_POW2, BP, N_POW2, BQ))
        ab = tl.arange(0, N_POW2)
        ab_offs = ab[:, None] * n + ab[None, :]
        ab_ok = (ab[:, None] < n) & (ab[None, :] < n)
        pl = p0 + tl.arange(0, BP)
        ql = q0 + tl.arange(0, BQ)
        pq = pl[:, None] * O + ql[None, :]
        pq_ok = (pl < I)[:, None] & (ql < O)[None, :]
        IO = I * O
        n3 = n * n * n
        tile = pid_p * tl.num_programs(1) + pid_q
        dwp_split = dwp_ptr + split.to(tl.int64) * (n * IO)
        drp_tile = drp_ptr + (split * tl.num_programs(0) * tl.num_programs(1) + tile).to(tl.int64) * n3
        for i in tl.static_range(N_POW2):
            i_ok = i < n
            coef = tl.load(r_ptr + i * n * n + ab_offs, mask=ab_ok & i_ok, other=0.0).to(tl.float32)
            dw_i = tl.sum(tl.sum(coef[:, None, :, None] * g4, axis=2), axis=0)  # [BP, BQ]
            if splits == 1:
                tl.store(dw_ptr + i * IO + pq, dw_i.to(dw_ptr.dtype.element_ty), mask=pq_ok & i_ok)
            else:
                tl.store(dwp_split + i * IO + pq, dw_i, mask=pq_ok & i_ok)
            w_i = tl.load(w_ptr + i * IO + pq, mask=pq_ok & i_ok, other=0.0).to(tl.float32)
            dr_i = tl.sum(tl.sum(w_i[None, :, None, :] * g4, axis=3), axis=1)  # [NP (a), NP (b)]
            tl.store(drp_tile + i * n * n + ab_offs, dr_i, mask=ab_ok & i_ok)
    if (want_bias != 0) & (pid_p == 0):
        cols = b_blk * O + q
        if splits == 1:
            tl.store(db_ptr + cols, dbias.to(db_ptr.dtype.element_ty), mask=q_ok)
        else:
            tl.store(dbp_ptr + split.to(tl.int64) * (n * O) + cols, dbias, mask=q_ok)


@triton.jit
def _grad_reduce_kernel(
    drp_ptr,
    dr_ptr,
    dwp_ptr,
    dw_ptr,
    dbp_ptr,
    db_ptr,
    n3,
    shares,
    size_w,
    size_b,
    splits,
    want_rules,
    BLOCK_N3: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program 0: ``drules = sum_t drp[t]`` over the ``shares`` rows (every split's tiles) in order,
    when ``want_rules``. Programs 1, ... (several splits only): ``BLOCK`` elements each of
    ``dweights`` (``size_w``), then of ``dbias`` (``size_b``), ``out[e] = sum_s part[s, e]`` over the
    splits in order. Deterministic."""
    pid = tl.program_id(0)
    if pid == 0:
        if want_rules != 0:
            k = tl.arange(0, BLOCK_N3)
            k_ok = k < n3
            dr = tl.zeros((BLOCK_N3,), dtype=tl.float32)
            for t in range(0, shares):
                dr += tl.load(drp_ptr + t * n3 + k, mask=k_ok, other=0.0)
            tl.store(dr_ptr + k, dr.to(dr_ptr.dtype.element_ty), mask=k_ok)
    else:
        blk = pid - 1
        blocks_w = tl.cdiv(size_w, BLOCK)
        src = dwp_ptr
        dst = dw_ptr
        size = size_w
        if blk >= blocks_w:
            blk -= blocks_w
            src = dbp_ptr
            dst = db_ptr
            size = size_b
        e = blk * BLOCK + tl.arange(0, BLOCK)
        ok = e < size
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        src += e
        for _s in range(0, splits):  # pointer stepped by a split: no s * size overflow
            acc += tl.load(src, mask=ok, other=0.0)
            src += size
        tl.store(dst + e, acc.to(dst.dtype.element_ty), mask=ok)


# Autotuned on GPUs over the per-arch candidates (``mm_candidates``), keyed by the layer's sizes and
# the dtype (Triton adds it); not by the row count N, which changes from batch to batch. Both
# kernels store each output element once and read no output: benchmarking them on the real
# arguments is harmless (no reset_to_zero / restore_value needed). The weight-gradient kernels are
# not autotuned: their tiles decide the row split, the workspaces' shapes and the next launch's
# arguments (``grad_h_splits``, ``drp [tiles, n^3]``), which an autotuner cannot change together.
_FORWARD = TunedKernel(_forward_kernel, key=["n", "I", "O"])
_GRAD_X = TunedKernel(_grad_x_kernel, key=["n", "I", "O"])


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"phm_linear (triton): dtype must be one of {DTYPES}, got {t.dtype}")


# Per-architecture tile table of the forward and grad_x kernels (issue #15 item 3), chosen from the
# compile check (compile_check --filter phm_linear; facts in benchmarks/notes/phm_linear.md):
# for each BLOCK_N (n_pow2 * the output block width rounded up, 16 to 64: the widest tile re-reads x
# the fewest times) the BLOCK_K values in order of preference. Rows: arch -> dtype kind -> BLOCK_N ->
# BLOCK_Ks. ``DEFAULT_ARCH`` (other architectures, the interpreter) is the sm_80 row.
_BK_BY_OCCUPANCY = {16: (16, 32), 32: (16, 32), 64: (16,)}
# fp32 (IEEE dots on the FMA units, 32-row tiles): BLOCK_K = 16 only. With the every-block tiles
# BLOCK_K = 32 costs 128 registers at BLOCK_N 16 (31% -> 25% occupancy) and 246-255 at BLOCK_N 32
# (n = 2, 12%), on sm_80 and sm_90 alike.
_BK_FP32 = {16: (16,), 32: (16,), 64: (16,)}
MM_TABLE = {
    # sm_80, fp16/bf16: BLOCK_K = 16 first; BLOCK_K = 32 always costs occupancy (more registers):
    # n=2 BN=16 75% -> 62%, BN=32 56% -> 44%, n=4 BN=16 56% -> 50% (the every-block kernels).
    80: {"fp32": _BK_FP32, "half": _BK_BY_OCCUPANCY},
    # sm_90 (fp16/bf16 HGMMA, 64-row tiles, 4 warps = one warpgroup): BLOCK_K = 32 never gains
    # occupancy (n=2 BN=16 75%/75%, BN=32 62%/62%, n=4 BN=16 62%/62%) and doubles the shared memory
    # (n=2 BN=16: 4.5 -> 9.5 KB): 16 first, 32 offered second. fp32: as sm_80.
    90: {"fp32": _BK_FP32, "half": _BK_BY_OCCUPANCY},
}
MM_TABLE[DEFAULT_ARCH] = MM_TABLE[80]
MM_MAX_CANDIDATES = 3


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _mm_tile(bm: int, bn: int, bk: int, stages: int) -> TileConfig:
    return TileConfig.of(NUM_WARPS, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def mm_candidates(
    arch: int, dtype: torch.dtype, cols: int, reduce: int, n: int = 1, aligned: bool = True
) -> tuple[TileConfig, ...]:
    """Candidate tiles of the forward (``cols = O``, ``reduce = I``) and grad_x (``cols = I``,
    ``reduce = O``) kernels on ``arch``, the fixed one first. With ``N_UNROLL = next_pow2(n) > 0``
    (``mm_unroll``) the tile holds every block: ``BLOCK_N`` = ``N_UNROLL * cols`` rounded up to a power
    of two (16 to 64: the widest tile re-reads ``x`` the fewest times) with its ``BLOCK_K`` in the
    table's order (32 only when ``N_UNROLL * reduce`` is wider than 16), then half that ``BLOCK_N``
    (more programs when there are few rows); ``num_stages = 2``, or 1 for fp16/bf16 when not
    ``aligned`` (``mm_align``: the loads would be 2-byte, below cp.async's 4)."""
    row = arch_row(MM_TABLE, arch)[_kind(dtype)]
    np2 = mm_unroll(dtype, n)
    stages = NUM_STAGES if aligned or dtype == torch.float32 else 1
    bm = BLOCK_M_FP32 if dtype == torch.float32 else BLOCK_M
    bk_max = 32 if np2 * reduce > 16 else 16
    bn = _pow2_clamp(np2 * cols, 16, 64)
    out = [_mm_tile(bm, bn, bk, stages) for bk in row[bn] if bk <= bk_max]
    if bn > 16:
        out += [_mm_tile(bm, bn // 2, next(bk for bk in row[bn // 2] if bk <= bk_max), stages)]
    for c in out:
        assert (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in MM_CONFIGS
    return tuple(out[:MM_MAX_CANDIDATES])


def _mm_grid(N: int, np2: int, cols: int):
    """The forward / grad_x grid for a tile ``m``: row blocks x chunks of ``BLOCK_N // np2`` columns
    of every block at once."""
    return lambda m: (triton.cdiv(N, m["BLOCK_M"]), triton.cdiv(cols, m["BLOCK_N"] // np2))


def forward_config(
    I: int, O: int, dtype: torch.dtype = torch.float32, arch: int = DEFAULT_ARCH, n: int = 1
) -> dict:
    """The fixed forward tile (what the interpreter and the compile check launch)."""
    return mm_candidates(arch, dtype, O, I, n)[0].kwargs


def grad_x_config(
    I: int, O: int, dtype: torch.dtype = torch.float32, arch: int = DEFAULT_ARCH, n: int = 1
) -> dict:
    return mm_candidates(arch, dtype, I, O, n)[0].kwargs


def grad_h_config(n: int, I: int, O: int, dtype: torch.dtype, arch: int) -> dict:
    """Tile of the ``dH`` GEMM (``_grad_h_kernel``): ``BLOCK_P`` rows ``(a, p)`` by ``BLOCK_Q`` columns
    ``(b, q)`` of every block at once (``N_POW2`` blocks a side), ``BLOCK_R`` rows of x a step: the
    sides ``N_POW2 * I`` and ``N_POW2 * O`` rounded up to a power of two, 32 to 64. On sm_90
    fp16/bf16 ``BLOCK_P`` is 64 whatever ``I`` (wgmma's 64-row tile per warpgroup: HGMMA, not HMMA)."""
    np2 = mm_unroll(dtype, n)
    lo, hi = min(GRAD_H_TILES), max(GRAD_H_TILES)
    lo_p = hi if arch >= 90 and dtype != torch.float32 else lo
    return {
        "BLOCK_P": _pow2_clamp(np2 * I, lo_p, hi),
        "BLOCK_Q": _pow2_clamp(np2 * O, lo, hi),
        "BLOCK_R": BLOCK_R,
        "N_POW2": np2,
    }


def _arch(device: torch.device) -> int:
    """The row of the tile tables (``registry.launch_arch``): 0 under the interpreter."""
    return launch_arch(device)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter


def grad_h_splits(
    N: int, in_features: int, out_features: int, tiles: int, element_size: int, device: torch.device,
    splits: int | None = None, partial: int = 0,
) -> tuple[int, int]:  # fmt: skip
    """``(splits, rows_per_split)`` of the ``dH`` GEMM's reduction over the N rows (split-K).

    Enough splits for about ``_target_programs`` programs, but the round trip of the splits' fp32
    partials (``partial`` elements a split: ``dweights`` and ``dbias``; ``8 * splits * partial``
    bytes written and read back) at most ``1 / WORKSPACE_SHARE`` of the bytes of ``x`` and ``dy``
    read: past that, splitting costs more traffic than the parallelism is worth on a compute-light
    weight gradient. ``splits`` (tests) overrides the choice."""
    if splits is None:
        want = -(-_target_programs(device) // max(tiles, 1))
        budget = N * (in_features + out_features) * element_size
        budget //= WORKSPACE_SHARE * 8 * max(partial, 1)
        splits = min(want, budget)
    splits = max(1, min(int(splits), triton.cdiv(N, BLOCK_R)))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), BLOCK_R) * BLOCK_R
    return triton.cdiv(N, rows_per_split), rows_per_split


def phm_linear_forward(x2, rules, weights, bias, out) -> torch.Tensor:
    """``out[N, n*O] = x2[N, n*I] @ H + bias``, written into ``out`` (contiguous rows)."""
    _check_dtype(x2)
    rules = rules.contiguous()
    weights = weights.contiguous()
    n, I, O = weights.shape
    N = x2.shape[0]
    assert out.shape == (N, n * O) and out.stride(1) == 1
    np2 = mm_unroll(x2.dtype, n)
    align = mm_align(x2, weights, I, O)
    _FORWARD.launch(
        _mm_grid(N, np2, O),
        mm_candidates(_arch(x2.device), x2.dtype, O, I, n, align > 1),
        x2, rules, weights, bias.contiguous() if bias is not None else out, out,
        N, n, I, O, int(bias is not None),
        x2.stride(0), x2.stride(1), out.stride(0),
        DOT_PRECISION=DOT_PRECISION, N_UNROLL=np2, ALIGN=align, device=x2.device,
    )  # fmt: skip
    return out


def phm_linear_backward(
    dy2, x2, rules, weights, grad_x, grad_rules, grad_weights, grad_bias, *, splits: int | None = None
) -> None:
    """Fill the gradients that are not None: ``grad_x [N, n*I]``, ``grad_rules [n, n, n]``,
    ``grad_weights [n, I, O]``, ``grad_bias [n*O]``. ``splits`` (tests) fixes the weight gradient's
    row split (``grad_h_splits``)."""
    _check_dtype(x2)
    rules = rules.contiguous()
    weights = weights.contiguous()
    n, I, O = weights.shape
    N = x2.shape[0]
    if grad_x is not None:
        assert grad_x.shape == (N, n * I) and grad_x.stride(1) == 1
        np2 = mm_unroll(dy2.dtype, n)
        align = mm_align(dy2, weights, O, I)
        _GRAD_X.launch(
            _mm_grid(N, np2, I),
            mm_candidates(_arch(dy2.device), dy2.dtype, I, O, n, align > 1),
            dy2, rules, weights, grad_x, N, n, I, O,
            dy2.stride(0), dy2.stride(1), grad_x.stride(0),
            DOT_PRECISION=DOT_PRECISION, N_UNROLL=np2, ALIGN=align, device=dy2.device,
        )  # fmt: skip
    want_params = grad_rules is not None or grad_weights is not None
    want_bias = grad_bias is not None
    if not (want_params or want_bias):
        return
    grad_params(dy2, x2, rules, weights, grad_rules, grad_weights, grad_bias, splits=splits)


def _out_buffer(t: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """``t`` itself when the kernels can write it in place (contiguous, right dtype), else a new buffer."""
    if t is not None and t.is_contiguous() and t.dtype == dtype and tuple(t.shape) == tuple(shape):
        return t
    return _alloc.empty(shape, dtype=dtype, device=device)


def grad_params(dy2, x2, rules, weights, grad_rules, grad_weights, grad_bias, *, splits=None) -> None:
    """The parameter gradients, deterministic (no atomics; every sum in a fixed order):

    1. ``_grad_h_kernel``: ``dH = x^T dy`` with ``tl.dot`` on tiles of every Kronecker block at once
       (split over rows when the tiles alone would not fill the GPU), contracted in registers to
       ``dweights[i] = sum_ab rules[i, a, b] dH_ab`` (in place with one split, else per-split fp32
       partials), the tile's share of ``drules[i, a, b] = <weights[i], dH_ab>`` and ``dbias``;
    2. ``_grad_reduce_kernel`` (when drules is asked for or there are several splits): the
       ``drules`` shares summed in order, and the splits' partials.
    """
    rules = rules.contiguous()
    weights = weights.contiguous()
    n, I, O = weights.shape
    N = x2.shape[0]
    in_f, out_f = n * I, n * O
    dev, dt = x2.device, x2.dtype
    want_params = grad_rules is not None or grad_weights is not None
    want_bias = grad_bias is not None
    hc = grad_h_config(n, I, O, dt, _arch(dev))
    np2 = hc["N_POW2"]
    # bias only: the first p-tile alone (its dot still runs; only the column sums are stored)
    tiles_p = triton.cdiv(I, hc["BLOCK_P"] // np2) if want_params else 1
    tiles = tiles_p * triton.cdiv(O, hc["BLOCK_Q"] // np2)
    size_w = n * I * O if want_params else 0
    size_b = out_f if want_bias else 0
    splits, rows_per_split = grad_h_splits(
        N, in_f, out_f, tiles, x2.element_size(), dev, splits, size_w + size_b
    )
    align = min(mm_align(x2, weights, I, O), mm_align(dy2, weights, I, O))
    stages = NUM_STAGES if align > 1 or dt == torch.float32 else 1
    f32 = torch.float32
    unused = _alloc.empty((1,), dtype=dt, device=dev)  # pointer argument of a gradient not asked for
    unused32 = _alloc.empty((1,), dtype=f32, device=dev)
    dw = _out_buffer(grad_weights, (n, I, O), dt, dev) if want_params else unused
    db = _out_buffer(grad_bias, (out_f,), dt, dev) if want_bias else unused
    dwp = _alloc.empty((splits, n, I, O), dtype=f32, device=dev) if want_params and splits > 1 else unused32
    dbp = _alloc.empty((splits, out_f), dtype=f32, device=dev) if want_bias and splits > 1 else unused32
    drp = _alloc.empty((splits * tiles, n**3) if want_params else (1,), dtype=f32, device=dev)
    _grad_h_kernel[(tiles_p, tiles // tiles_p, splits)](
        x2, dy2, rules, weights, dw, db, dwp, dbp, drp, N, n, I, O, rows_per_split, splits,
        int(want_params), int(want_bias), x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
        ALIGN=align, DOT_PRECISION=DOT_PRECISION, num_warps=NUM_WARPS, num_stages=stages, **hc,
    )  # fmt: skip
    want_rules = grad_rules is not None
    dr = _out_buffer(grad_rules, (n, n, n), dt, dev) if want_rules else unused
    blocks = triton.cdiv(size_w, REDUCE_BLOCK) + triton.cdiv(size_b, REDUCE_BLOCK) if splits > 1 else 0
    if want_rules or blocks:
        _grad_reduce_kernel[(1 + blocks,)](
            drp, dr, dwp, dw, dbp, db, n**3, splits * tiles, size_w, size_b, splits, int(want_rules),
            BLOCK_N3=rules_block(n), BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    if want_rules and dr is not grad_rules:
        grad_rules.copy_(dr)
    if grad_weights is not None and dw is not grad_weights:
        grad_weights.copy_(dw)
    if want_bias and db is not grad_bias:
        grad_bias.copy_(db)


def rules_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n**3))


# ---------------------------------------------------------------------------------------------
# Registry: every configuration the launchers can choose, and small launches with their floors.


def _mm_signature(names_ptr: list[str], t: str, ints: list[str], constexprs: list[str]) -> dict[str, str]:
    sig = {name: f"*{t}" for name in names_ptr}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


MM_SHAPE_SWEEP = (1, 16, 17, 32, 33, 64, 65)  # block widths covering every BLOCK_N / BLOCK_K rule


def mm_table_tiles(dtype: torch.dtype, n: int = 1) -> dict[TileConfig, tuple[int, ...] | None]:
    """Every forward/grad_x tile ``mm_candidates`` can offer for ``dtype`` and ``n`` (aligned, the
    candidates' ``num_stages`` as is) on the checked architectures, with the architectures that offer
    it (None: all): the compile specs."""
    archs: dict[TileConfig, set[int]] = {}
    for arch in TABLE_ARCHS:
        for cols in MM_SHAPE_SWEEP:
            for reduce in MM_SHAPE_SWEEP:
                for c in mm_candidates(arch, dtype, cols, reduce, n):
                    archs.setdefault(c, set()).add(arch)
    order = sorted(archs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))
    return {c: None if archs[c] == set(TABLE_ARCHS) else tuple(sorted(archs[c])) for c in order}


def _mm_variants(dt: torch.dtype) -> list[tuple[int, int, int, int]]:
    """``(n, N_UNROLL, ALIGN, num_stages)`` of the forward / grad_x launches the launchers can make for
    ``dt`` (``mm_unroll``, ``mm_align``, ``mm_candidates``): per compiled ``n`` the aligned fp16/bf16
    launch (16-byte vectors, 2 stages) and the unaligned one (1 stage), fp32's one (2 stages)."""
    out = []
    for n in COMPILE_N:
        np2 = mm_unroll(dt, n)
        if dt == torch.float32:
            out.append((n, np2, 1, NUM_STAGES))
        else:
            out += [(n, np2, HALF_ALIGN, NUM_STAGES), (n, np2, 1, 1)]
    return out


@register_compile_specs(OP)
def _compile_specs() -> list[CompileSpec]:
    specs = []
    mm_consts = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_PRECISION", "N_UNROLL", "ALIGN"]
    for dt in DTYPES:
        t = _TL[dt]
        for n, nu, align, stages in _mm_variants(dt):
            for tile, archs in mm_table_tiles(dt, n).items():
                consts = {**tile.kwargs, "DOT_PRECISION": DOT_PRECISION, "N_UNROLL": nu, "ALIGN": align}
                bn, bk = consts["BLOCK_N"], consts["BLOCK_K"]
                inner = f"{t},N_UNROLL={nu},ALIGN={align},BM={consts['BLOCK_M']},BN={bn},BK={bk}"
                sig = _mm_signature(
                    ["x_ptr", "r_ptr", "w_ptr", "b_ptr", "y_ptr"],
                    t,
                    ["N", "n", "I", "O", "has_bias", "stride_xm", "stride_xk", "stride_ym"],
                    mm_consts,
                )
                specs.append(
                    CompileSpec(
                        name=f"phm_linear_fwd[{inner}]",
                        kernel=_forward_kernel,
                        signature=sig,
                        constexprs=consts,
                        num_warps=tile.num_warps,
                        num_stages=stages,
                        uses_dot=True,
                        archs=archs,
                    )
                )
                sig = _mm_signature(
                    ["dy_ptr", "r_ptr", "w_ptr", "dx_ptr"],
                    t,
                    ["N", "n", "I", "O", "stride_dym", "stride_dyk", "stride_dxm"],
                    mm_consts,
                )
                specs.append(
                    CompileSpec(
                        name=f"phm_linear_grad_x[{inner}]",
                        kernel=_grad_x_kernel,
                        signature=sig,
                        constexprs=consts,
                        num_warps=tile.num_warps,
                        num_stages=stages,
                        uses_dot=True,
                        archs=archs,
                    )
                )
        for n in COMPILE_N:
            np2 = mm_unroll(dt, n)
            variants = [(1, NUM_STAGES)] if dt == torch.float32 else [(HALF_ALIGN, NUM_STAGES), (1, 1)]
            for align, stages in variants:
                for bp in GRAD_H_TILES:
                    for bq in GRAD_H_TILES:
                        sig = {k: f"*{t}" for k in ("x_ptr", "dy_ptr", "r_ptr", "w_ptr", "dw_ptr", "db_ptr")}
                        sig.update({k: "*fp32" for k in ("dwp_ptr", "dbp_ptr", "drp_ptr")})
                        ints = ["N", "n", "I", "O", "rows_per_split", "splits", "want_params", "want_bias"]
                        ints += ["stride_xm", "stride_xk", "stride_dym", "stride_dyk"]
                        sig.update({name: "i32" for name in ints})
                        consts = {"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_R": BLOCK_R, "N_POW2": np2}
                        consts.update({"ALIGN": align, "DOT_PRECISION": DOT_PRECISION})
                        sig.update({name: "constexpr" for name in consts})
                        specs.append(
                            CompileSpec(
                                name=f"phm_linear_grad_h[{t},N_POW2={np2},ALIGN={align},BP={bp},BQ={bq},BR={BLOCK_R}]",
                                kernel=_grad_h_kernel,
                                signature=sig,
                                constexprs=consts,
                                num_warps=NUM_WARPS,
                                num_stages=stages,
                                uses_dot=True,
                                # sm_90 fp16/bf16 launches BLOCK_P = 64 only (grad_h_config)
                                archs=(80,) if bp < 64 and dt != torch.float32 else None,
                            )
                        )
        for block in sorted({rules_block(n) for n in COMPILE_N}, reverse=True):
            sig = {"drp_ptr": "*fp32", "dr_ptr": f"*{t}", "dwp_ptr": "*fp32", "dw_ptr": f"*{t}"}
            sig.update({"dbp_ptr": "*fp32", "db_ptr": f"*{t}"})
            sig.update({k: "i32" for k in ("n3", "shares", "size_w", "size_b", "splits", "want_rules")})
            sig.update({"BLOCK_N3": "constexpr", "BLOCK": "constexpr"})
            specs.append(
                CompileSpec(
                    name=f"phm_linear_grad_reduce[{t},BLOCK_N3={block},BLOCK={REDUCE_BLOCK}]",
                    kernel=_grad_reduce_kernel,
                    signature=sig,
                    constexprs={"BLOCK_N3": block, "BLOCK": REDUCE_BLOCK},
                    num_warps=NUM_WARPS,
                    num_stages=None,
                )
            )
    return specs


@register_launch_cases(OP)
def _launch_cases() -> list[LaunchCase]:
    from prompt_kernels.floors import phm_linear_floors

    cases = []
    for dt, (N, in_f, out_f, n) in ((torch.float32, (64, 96, 48, 4)), (torch.float16, (40, 64, 32, 2))):
        I, O = in_f // n, out_f // n
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, in_f, generator=g).to(dt)
        rules = torch.randn(n, n, n, generator=g).to(dt)
        w = torch.randn(n, I, O, generator=g).to(dt)
        bias = torch.randn(out_f, generator=g).to(dt)
        dy = torch.randn(N, out_f, generator=g).to(dt)
        fl = phm_linear_floors(N, in_f, out_f, n, x.element_size(), bias=True)
        t = _TL[dt]
        size = f"x[{N},{in_f}]->{out_f} n={n}"

        def fwd(x=x, rules=rules, w=w, bias=bias):
            out = _alloc.empty((x.shape[0], w.shape[0] * w.shape[2]), dtype=x.dtype, device=x.device)
            return phm_linear_forward(x, rules, w, bias, out)

        def bwd(x=x, rules=rules, w=w, dy=dy):
            gx, gr, gw = _alloc.empty_like(x), _alloc.empty_like(rules), _alloc.empty_like(w)
            gb = _alloc.empty((dy.shape[1],), dtype=dy.dtype, device=dy.device)
            phm_linear_backward(dy, x, rules, w, gx, gr, gw, gb)
            return gx, gr, gw, gb

        note = "bytes and flops scale as in phm_linear_floors(rows, in, out, n, element_size)"
        cases.append(
            LaunchCase(
                f"phm_linear fwd {t} {size}", OP, "forward", fwd, fl.forward_bytes, fl.forward_flops, note
            )
        )
        cases.append(
            LaunchCase(
                f"phm_linear bwd {t} {size}", OP, "backward", bwd, fl.backward_bytes, fl.backward_flops, note
            )
        )
    return cases
