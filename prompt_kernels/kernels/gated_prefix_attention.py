"""Triton kernels for gated prefix attention (FlashAttention-2 style, two key segments).

Shapes (strides are free except a unit stride on the last dimension, which the launchers enforce):

    q, out, grad_out:  [B, H, T, Dh]
    k, v:              [B, Hkv, S, Dh]           kv head of query head h: h // (H // Hkv)
    pk, pv:            [B or 1, Hkv, P, Dh]      batch 1 is read with batch stride 0
    gate:              [1 or B, 1 or H] float32, read as gate[b, h] with stride 0 along broadcast
                       dimensions (no [B, H] copy); dgate is accumulated in the same shape
    mask:              none | uint8 [B, S] key padding | additive [B, 1 or H, T, S] (query dtype)
    lse:               [B, H, T] float32, natural log; +inf on rows with no weight (their output is
                       0), below ``SATURATED_LSE`` on saturated rows (see below)

Grids: one program per (block, batch x head) (the forward and dk/dv: batch x kv head) on grid axis
x (``_grid``; CUDA allows 2^31 - 1 programs there and only 65,535 on y and z), split in the kernel as
``block = pid % blocks``, ``bh = pid // blocks``: consecutive programs work on the same head, as with
a 2-D grid. Element offsets are 64-bit: the head index and the row indices are widened before they
scale a stride.

Forward, one program per (BLOCK_M packed query rows, b, kv head): the rows are the queries of the
kv head's GROUP = H / Hkv query heads, packed query-major (row r: query t = r // GROUP of head
hk * GROUP + r % GROUP), so that each K/V and prompt tile is loaded once per block of the whole group
(not once per query head: 1.44x-1.57x the byte floor at GQA 2 before) and a block's queries stay
contiguous for the causal limits. q, out, lse, the gate and an additive per-head mask are addressed
per row. The online softmax runs over the P prompt keys (logit ``scale * q.pk + log(gate)``, -inf on
a row whose gate is 0, skipped entirely when the whole group's gates are 0), then over the S keys
(masked, causal bottom-right), in base 2. The running max is made safe for rows that have seen only
-inf.

Saturated keys: an additive mask value whose base-2 logit would overflow (below -FLT_MAX * ln 2:
Hugging Face pads with ``finfo(float32 or bfloat16).min``) gives the logit -FLT_MAX exactly, whatever
q.k (which cannot move a number that large). A row whose weighted keys are all saturated (no prompt
weight: P = 0 or gate 0) is then softmax over equal logits: uniform over those keys, as softmax of
the biased scores gives in float64. Its log-sum-exp cannot be stored (log(count) vanishes next to
-FLT_MAX in float32), so the forward stores -FLT_MAX and the backward counts the row's saturated keys.

Backward (three launches; one for short key ranges or short query ranges, see below):
  * preprocess, per query row: ``delta = rowsum(grad_out * out)`` and the row's normaliser in base 2
    as two terms, ``hi`` (lse * log2(e), -FLT_MAX on saturated rows) and ``lo`` (0, log2 of the
    row's count of saturated keys on saturated rows), so that ``p = exp2((s - hi) - lo)``; it also
    zeroes dgate (the gate's shape);
  * dk, dv and the prompt's: one launch whose grid covers, per (b, kv head), the prompt key blocks
    and then the key blocks; each program loops over the query heads of the group and the query
    blocks that can see its keys and writes its rows once (the prompt's per batch item: in the input
    dtype, or float32 partials summed over the batch by the launcher when the prompt is broadcast).
    Prompt programs add their dgate terms ``sum exp(s_ungated - lse) * (dP - delta)`` (finite at
    gate = 0: the exponent is clamped as the reference clamps it, so a row with no key weight and a
    zero grad_out adds 0, not inf * 0) to dgate with one atomic add per (b, h, prompt block);
  * dq: one program per (BLOCK_M queries, b, h) over both segments.
Unmasked fast path: without a padding/additive mask, the key blocks that every query of a block sees
(inside S, below the causal diagonal) skip the mask/causal ``where``s in the forward, dk/dv and dq;
only the diagonal blocks (and a partial last key block) take the masked path (``FAST``).
Short key ranges (``fused_tile``: the S keys within one key block and the P prompt keys within one
prompt block, e.g. prompt-tuned classifiers with T ~ 64): one launch instead, one program per
(b, kv head) holding all its keys (``_gpa_bwd_fused_kernel``): it loops over the group's query heads
and their query blocks, computes delta, hi and lo per block itself (the saturated keys counted on the
block's logits), and the five products of the floor per segment; dq is complete and written once
(no dq launch, no atomics), q, grad_out and out are read once; dgate is zeroed by the launcher and
added to atomically as above. fp16/bf16 on GPUs; fp32 only under the interpreter (see FUSED_TABLE).
Short query ranges (``rows_tile``: longer key ranges, but the GROUP * T packed query rows of a kv
head within one block, e.g. T = 128 classifiers, or T = 64 at GQA 2, on sm_90): one launch, one
program per (b, kv head) holding q, dO and the float32 dq of all its rows (``_gpa_bwd_rows_kernel``),
looping over the prompt key blocks and the key blocks: each block's five products, its dk and dv
complete and written once, dq written once at the end; every input read once (see ROWS_TABLE for
where it applies per architecture).
The T x (P + S) probability matrix never exists in global memory.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from prompt_kernels import _alloc, floors
from prompt_kernels.kernels import interpreting
from prompt_kernels.kernels.registry import (
    DEFAULT_ARCH,
    TABLE_ARCHS,
    CompileSpec,
    LaunchCase,
    TileConfig,
    TunedKernel,
    arch_row,
    autotune_enabled,
    interpreter_arch,
    launch_arch,
    register_compile_specs,
    register_launch_cases,
)

OP = "gated_prefix_attention"
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FLT_MAX = 3.4028234663852886e38
# A stored (natural) log-sum-exp below this marks a saturated row; the CPU path (ops) uses the same.
SATURATED_LSE = -FLT_MAX * LN2
# exp's argument is clamped at log(FLT_MAX) - 1 where a gated-out prompt logit may exceed the row's
# normaliser (the reference does the same); here in base 2.
EXP2_CLAMP = (math.log(FLT_MAX) - 1.0) * LOG2E
MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis x (y and z: 65,535)

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
_NEG_MAX = tl.constexpr(-FLT_MAX)
_SAT_LSE = tl.constexpr(SATURATED_LSE)
_EXP2_CLAMP = tl.constexpr(EXP2_CLAMP)


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _rows(base, rows, stride, offs_d, D_PAD: tl.constexpr):
    """Pointers [len(rows), D_PAD] to rows of a [..., Dh] tensor (64-bit row offsets). The launcher
    guarantees 16-byte aligned rows (data pointer and every stride), so the hints let the loads
    vectorise."""
    ptrs = base + rows[:, None].to(tl.int64) * stride + offs_d[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, D_PAD])


@triton.jit
def _head_ok(offs_d, HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr):
    """Which of the D_PAD columns are inside the head. HEAD_DIM is a runtime argument, so head sizes
    that pad alike share one compile (80, 96 and 128: ``even_d``); with EVEN_D (the head fills D_PAD)
    the mask is the constant True, as a constexpr head size gave."""
    if EVEN_D:
        return offs_d < D_PAD
    else:
        return offs_d < HEAD_DIM


@triton.jit
def _load_rows(ptrs, r_ok, d_ok, ROWS_OK: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, D_PAD] tile: no mask where every row is in range (ROWS_OK) and the head size is a
    power of two (EVEN_D); else masked loads with zeros."""
    if ROWS_OK and EVEN_D:
        x = tl.load(ptrs)
    elif ROWS_OK:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    return x


@triton.jit
def _unmasked_key_end(pid_m, S, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Keys [0, end), end a multiple of BLOCK_N: whole key blocks inside S that every query of block
    pid_m sees (no padding mask assumed): the forward and dq skip the mask/causal ``where``s there."""
    if IS_CAUSAL:
        return tl.minimum(tl.maximum(pid_m * BLOCK_M + 1 + S - T, 0), S) // BLOCK_N * BLOCK_N
    else:
        return S // BLOCK_N * BLOCK_N


@triton.jit
def _split_pid(n_blocks, heads):
    """The program's (block, batch, head) from a 1-D grid of n_blocks * B * heads programs; batch
    and head as int64, so that products with strides are 64-bit."""
    pid = tl.program_id(0)
    pid_bh = pid // n_blocks
    return pid % n_blocks, pid_bh, (pid_bh // heads).to(tl.int64), (pid_bh % heads).to(tl.int64)


@triton.jit
def _additive2(add):
    """An additive mask value (float32) in base-2 units. Where * log2(e) overflows (Hugging Face's
    finfo.min padding) it saturates at -FLT_MAX, which stays finite (see the module docstring);
    a true -inf stays -inf."""
    add2 = add * _LOG2E
    return tl.where((add2 == float("-inf")) & (add > float("-inf")), _NEG_MAX, add2)


@triton.jit
def _mask_tile(MASK, mask_base, rows, cols, r_ok, c_ok, smt):
    """The additive mask's [BLOCK_M, BLOCK_N] tile (64-bit row offsets) in base 2."""
    add = tl.load(
        MASK + mask_base + rows[:, None].to(tl.int64) * smt + cols[None, :],
        mask=r_ok[:, None] & c_ok[None, :],
        other=0.0,
    )
    return _additive2(add.to(tl.float32))


@triton.jit
def _mask_keys(
    s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr
):
    """Apply key padding / additive mask / causal limit to base-2 logits s [BLOCK_M, BLOCK_N]."""
    if MASK_KIND == 1:
        keep = tl.load(MASK + mask_base + cols, mask=c_ok, other=0)
        s = tl.where(keep[None, :] != 0, s, float("-inf"))
    if MASK_KIND == 2:
        s = s + _mask_tile(MASK, mask_base, rows, cols, r_ok, c_ok, smt)
    if IS_CAUSAL:
        s = tl.where(cols[None, :] <= rows[:, None] + (S - T), s, float("-inf"))
    return tl.where(c_ok[None, :], s, float("-inf"))


@triton.jit
def _mask_keys_t(
    s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr
):
    """_mask_keys on transposed base-2 logits s [BLOCK_N keys, BLOCK_M queries] (the dk/dv kernel)."""
    if MASK_KIND == 1:
        keep = tl.load(MASK + mask_base + cols, mask=c_ok, other=0)
        s = tl.where(keep[:, None] != 0, s, float("-inf"))
    if MASK_KIND == 2:
        add = tl.load(
            MASK + mask_base + rows[None, :].to(tl.int64) * smt + cols[:, None],
            mask=r_ok[None, :] & c_ok[:, None],
            other=0.0,
        )
        s = s + _additive2(add.to(tl.float32))
    if IS_CAUSAL:
        s = tl.where(cols[:, None] <= rows[None, :] + (S - T), s, float("-inf"))
    return tl.where(c_ok[:, None], s, float("-inf"))


@triton.jit
def _online_step(s, v, m_i, l_i, acc, FP32: tl.constexpr):
    """One online-softmax update with base-2 logits s [BLOCK_M, BLOCK_N], values v [BLOCK_N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf keeps m = -inf; subtracting 0 instead avoids (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32)
    return m_new, l_i, acc


@triton.jit
def _causal_key_end(pid_m, S, T, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Keys [0, end) that some query of block pid_m can see (query t sees keys <= t + S - T)."""
    if IS_CAUSAL:
        return tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + S - T, 0), S)
    else:
        return S


# fp32 QK^T in the forward: above this padded head size, in head-dimension chunks of FP32_QK_CHUNK.
FP32_QK_SPLIT_ABOVE = 64
FP32_QK_CHUNK = 32
_QK_SPLIT_ABOVE = tl.constexpr(FP32_QK_SPLIT_ABOVE)
_QK_CHUNK = tl.constexpr(FP32_QK_CHUNK)


@triton.jit
def _qk_chunked(
    q_base, rows, sqt, r_ok, k_base, cols, sks, c_ok, HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """fp32 q @ k^T [BLOCK_M, BLOCK_N] (unscaled) of the query rows ``rows`` of q_base and the key
    rows ``cols`` of k_base, over head-dimension chunks of FP32_QK_CHUNK. An IEEE dot on the FMA units
    holds each thread's operand rows along the whole reduction in registers (q's, hoisted out of the
    key loop, and k's): at Dh 80-128 the forward spilled ~680 B even on 16 x 16 tiles. Chunked, the
    query chunks are reloaded per key block (from L1/L2; fp32 is the CPU tests' dtype)."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in tl.static_range(0, D_PAD, _QK_CHUNK):
        offs = d0 + tl.arange(0, _QK_CHUNK)
        dc_ok = _head_ok(offs, HEAD_DIM, D_PAD, EVEN_D)
        qc = tl.load(
            _rows(q_base, rows, sqt, offs, _QK_CHUNK), mask=r_ok[:, None] & dc_ok[None, :], other=0.0
        )
        kc = tl.load(
            _rows(k_base, cols, sks, offs, _QK_CHUNK), mask=c_ok[:, None] & dc_ok[None, :], other=0.0
        )
        s += tl.dot(qc, tl.trans(kc), input_precision="ieee")
    return s


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _gpa_fwd_kernel(
    Q, K, V, PK, PV, G, MASK, OUT, LSE,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sob, soh, sot, sgb, sgh,
    H, GROUP, T, S, P, qk_scale,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FAST: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program per (BLOCK_M packed rows, b, kv head): packed row r is query t = r // GROUP of the
    # group's head hh = r % GROUP (query-major, so that a block's queries are contiguous and the
    # causal limits stay per block), and every K/V (and prompt) tile is loaded once for all of them.
    # (GROUP * T in 64 bits; the block count fits 32, the launcher's grid being below 2^31)
    n_blocks = tl.cdiv(T.to(tl.int64) * GROUP, BLOCK_M).to(tl.int32)
    pid_m, _, b, hk = _split_pid(n_blocks, H // GROUP)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = r // GROUP
    r_ok = t < T
    h = hk * GROUP + (r % GROUP)  # int64 [BLOCK_M]: the query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = _head_ok(offs_d, HEAD_DIM, D_PAD, EVEN_D)
    t_lo = pid_m * BLOCK_M // GROUP  # the block's first and last query (rows past T aside)
    t_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1)

    # 64-bit element offsets of each row (from the batch's base) in q and out.
    q_base = Q + b * sqb
    q_off = h * sqh + t.to(tl.int64) * sqt
    q = tl.load(_rows(q_base, q_off, 1, offs_d, D_PAD), mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Prompt segment: gate = 0 removes it exactly (the row's prompt logits are -inf, q.k being finite;
    # log2(0) is never computed), and the segment is skipped entirely when the whole group's gates are
    # 0. (The group's maximum from scalar loads: a tl.max over the rows' gates made ptxas spill.)
    g_max = 0.0
    for j in range(0, GROUP):
        g_max = tl.maximum(g_max, tl.load(G + b * sgb + (hk * GROUP + j) * sgh))
    p_end = tl.where(g_max > 0, P, 0)
    g = tl.load(G + b * sgb + h * sgh, mask=r_ok, other=0.0)
    log2g = tl.where(g > 0, tl.log2(tl.where(g > 0, g, 1.0)), float("-inf"))
    pk_base = PK + b * spkb + hk * spkh
    pv_base = PV + b * spvb + hk * spvh
    for start in range(0, p_end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < P
        v = tl.load(_rows(pv_base, cols, spvp, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32 and D_PAD > _QK_SPLIT_ABOVE:
            s = _qk_chunked(
                q_base, q_off, 1, r_ok, pk_base, cols, spkp, c_ok, HEAD_DIM, D_PAD, EVEN_D, BLOCK_M, BLOCK_N
            )
        else:
            k = tl.load(
                _rows(pk_base, cols, spkp, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0
            )
            s = _dot(q, tl.trans(k), FP32)
        s = s * qk_scale + log2g[:, None]
        s = tl.where(c_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, FP32)

    # Key segment.
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if MASK_KIND == 2:  # additive [B, 1 or H, T, S]: each row's own offset (smh = 0 when broadcast)
        mask_base = (b * smb + h * smh + t.to(tl.int64) * smt)[:, None]
    else:  # key padding [B, S] (or none)
        mask_base = b * smb
    if IS_CAUSAL:
        end = tl.minimum(tl.maximum(t_hi + 1 + S - T, 0), S)
    else:
        end = S
    mid = 0
    if FAST and MASK_KIND == 0:
        # Whole key blocks that every query of the block sees: no mask/causal ``where``, unmasked loads.
        if IS_CAUSAL:
            mid = tl.minimum(tl.maximum(t_lo + 1 + S - T, 0), S) // BLOCK_N * BLOCK_N
        else:
            mid = S // BLOCK_N * BLOCK_N
        for start in range(0, mid, BLOCK_N):
            cols = start + offs_n
            v = _load_rows(_rows(v_base, cols, svs, offs_d, D_PAD), r_ok, d_ok, True, EVEN_D)
            if FP32 and D_PAD > _QK_SPLIT_ABOVE:
                s = _qk_chunked(
                    q_base,
                    q_off,
                    1,
                    r_ok,
                    k_base,
                    cols,
                    sks,
                    cols < S,
                    HEAD_DIM,
                    D_PAD,
                    EVEN_D,
                    BLOCK_M,
                    BLOCK_N,
                )
            else:
                k = _load_rows(_rows(k_base, cols, sks, offs_d, D_PAD), r_ok, d_ok, True, EVEN_D)
                s = _dot(q, tl.trans(k), FP32)
            s = s * qk_scale
            m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, FP32)
    for start in range(mid, end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < S
        v = tl.load(_rows(v_base, cols, svs, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32 and D_PAD > _QK_SPLIT_ABOVE:
            s = _qk_chunked(
                q_base, q_off, 1, r_ok, k_base, cols, sks, c_ok, HEAD_DIM, D_PAD, EVEN_D, BLOCK_M, BLOCK_N
            )
        else:
            k = tl.load(
                _rows(k_base, cols, sks, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0
            )
            s = _dot(q, tl.trans(k), FP32)
        s = s * qk_scale
        s = _mask_keys(s, MASK, mask_base, t, cols, r_ok, c_ok, 0, S, T, MASK_KIND, IS_CAUSAL)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, FP32)

    # Rows with no weight at all (every key masked, no prompt): zeros, lse = +inf. Saturated rows
    # (max logit -FLT_MAX, where log2(l) vanishes in the sum): lse = -FLT_MAX, the backward recounts.
    dead = m_i == float("-inf")
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(m_i == _NEG_MAX, _NEG_MAX, (m_i + tl.log2(l_safe)) * _LN2)
    lse = tl.where(dead, float("inf"), lse)
    o_off = h * soh + t.to(tl.int64) * sot
    tl.store(
        _rows(OUT + b * sob, o_off, 1, offs_d, D_PAD),
        out.to(OUT.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + (b * H + h) * T + t, lse, mask=r_ok)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _gpa_bwd_preprocess_kernel(
    OUT, DO, LSE, MASK, DELTA, HI, LO, DGATE,
    sob, soh, sot, sdob, sdoh, sdot, smb, smh, smt, sgb, sgh, H, T, S,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per query row: delta = sum_d grad_out * out, and the normaliser in base 2 as hi + lo (float32):
    hi = lse * log2(e), lo = 0; on saturated rows (lse < SATURATED_LSE) hi = -FLT_MAX and lo = log2 of
    the number of saturated keys the row sees (counted here, reading the mask rows of those rows only)."""
    pid_m, pid_bh, b, h = _split_pid(tl.cdiv(T, BLOCK_M), H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    r_ok = rows < T
    ok = r_ok[:, None] & _head_ok(offs_d, HEAD_DIM, D_PAD, EVEN_D)[None, :]
    o = tl.load(_rows(OUT + b * sob + h * soh, rows, sot, offs_d, D_PAD), mask=ok, other=0.0)
    do = tl.load(_rows(DO + b * sdob + h * sdoh, rows, sdot, offs_d, D_PAD), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_base = pid_bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + rows, mask=r_ok, other=float("inf"))
    saturated = lse < _SAT_LSE
    hi = tl.where(saturated, _NEG_MAX, lse * _LOG2E)
    lo = tl.zeros([BLOCK_M], tl.float32)
    if MASK_KIND == 2:  # (only an additive mask saturates keys)
        n_saturated = tl.sum(saturated.to(tl.int32), 0)
        end = tl.where(n_saturated > 0, _causal_key_end(pid_m, S, T, BLOCK_M, IS_CAUSAL), 0)
        count = tl.zeros([BLOCK_M], tl.int32)
        mask_base = b * smb + h * smh
        for start in range(0, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            c_ok = cols < S
            seen = (_mask_tile(MASK, mask_base, rows, cols, r_ok, c_ok, smt) == _NEG_MAX) & c_ok[None, :]
            if IS_CAUSAL:
                seen = seen & (cols[None, :] <= rows[:, None] + (S - T))
            count += tl.sum(seen.to(tl.int32), 1)
        lo = tl.where(saturated, tl.log2(tl.maximum(count, 1).to(tl.float32)), 0.0)
    tl.store(DELTA + row_base + rows, delta, mask=r_ok)
    tl.store(HI + row_base + rows, hi, mask=r_ok)
    tl.store(LO + row_base + rows, lo, mask=r_ok)
    if pid_m == 0:  # dgate (the gate's shape): the dk/dv launch adds the prompt blocks' terms atomically
        tl.store(DGATE + b * sgb + h * sgh, 0.0)


@triton.jit
def _dkdv_step(
    dk, dv, dg, k, v, q_base, do_base, HI, LO, DELTA, MASK, mask_base, row_base, start_m,
    offs_m, offs_d, d_ok, cols, c_ok, sqt, sdot, smt, T, S, g, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_PROMPT: tl.constexpr, MASKED: tl.constexpr,
    FP32: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M queries x BLOCK_N keys] step of the dk/dv kernel, computed transposed (keys x
    queries, as in Triton's FlashAttention-2 tutorial): every tl.dot has the BLOCK_N keys as its M
    dimension, so a 64-key tile fills wgmma's 64 rows on sm_90. Rows past T load q = dO = 0
    and hi = +inf, so their p is 0 and they add nothing; columns past the end only touch dk/dv rows
    that are never stored: the key segment needs the mask/causal ``where``s only where a padding or
    additive mask applies or the block crosses the causal diagonal (``MASKED``)."""
    rows = start_m + offs_m
    r_ok = rows < T
    qo_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(q_base, rows, sqt, offs_d, D_PAD), mask=qo_ok, other=0.0)
    do = tl.load(_rows(do_base, rows, sdot, offs_d, D_PAD), mask=qo_ok, other=0.0)
    hi = tl.load(HI + row_base + rows, mask=r_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=r_ok, other=0.0)
    s = _dot(k, tl.trans(q), FP32) * qk_scale  # [BLOCK_N, BLOCK_M]
    if IS_PROMPT:
        # The ungated probability exp(s - lse), its exponent clamped where the row's keys have
        # (next to) no weight and the gate is 0 (as the reference clamps it): finite, so that
        # p = gate * pu is 0 at gate 0 and d out / d gate below is 0 for a zero grad_out.
        # (lo is 0 on every row with prompt weight: not needed here.)
        s = tl.where(c_ok[:, None], s, float("-inf"))
        pu = tl.exp2(tl.minimum(s - hi[None, :], _EXP2_CLAMP))
        p = pu * g
    else:
        if MASKED:
            s = _mask_keys_t(s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND, IS_CAUSAL)
        if MASK_KIND == 2:  # (lo is 0 unless an additive mask saturates the row)
            lo = tl.load(LO + row_base + rows, mask=r_ok, other=0.0)
            p = tl.exp2(s - hi[None, :] - lo[None, :])
        else:
            p = tl.exp2(s - hi[None, :])
    dv += _dot(p.to(do.dtype), do, FP32)
    dp_delta = _dot(v, tl.trans(do), FP32) - delta[None, :]
    ds = p * dp_delta
    if IS_PROMPT:
        dg += tl.sum(pu * dp_delta, 0)  # d out / d gate: the ungated probability, finite at 0
    dk += _dot(ds.to(q.dtype), q, FP32)
    return dk, dv, dg


@triton.jit
def _dkdv_block(
    Q, K, V, G, MASK, DO, HI, LO, DELTA, DK, DV, DGATE, b, hk, pid_n,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    smb, smh, smt, sdob, sdoh, sdot,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    sgb, sgh, H, GROUP, T, S, N, qk_scale, sm_scale,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    IS_PROMPT: tl.constexpr, FAST: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk, dv of the N keys' block pid_n (the S keys, or with IS_PROMPT the P prompt keys, whose logits
    carry log(gate) and which also add their dgate terms to DGATE, the gate's shape read through the
    broadcast strides sgb, sgh, with an atomic add)."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = _head_ok(offs_d, HEAD_DIM, D_PAD, EVEN_D)
    c_ok = cols < N
    kv_ok = c_ok[:, None] & d_ok[None, :]
    k = tl.load(_rows(K + b * skb + hk * skh, cols, sks, offs_d, D_PAD), mask=kv_ok, other=0.0)
    v = tl.load(_rows(V + b * svb + hk * svh, cols, svs, offs_d, D_PAD), mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    lo_m = 0
    # Query blocks from mid_m on see every key of the block: no mask/causal ``where`` there.
    mid_m = T
    if not IS_PROMPT:
        if IS_CAUSAL:
            # The first query that sees key pid_n * BLOCK_N is t = key - (S - T); the first that sees
            # the block's last key is t = pid_n * BLOCK_N + BLOCK_N - 1 - (S - T).
            lo_m = tl.maximum(pid_n * BLOCK_N - (S - T), 0) // BLOCK_M * BLOCK_M
            if FAST and MASK_KIND == 0:
                mid_m = tl.minimum(
                    tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (S - T), 0), BLOCK_M) * BLOCK_M, T
                )
        elif FAST and MASK_KIND == 0:
            mid_m = 0
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        bh = b * H + h
        row_base = bh * T
        g = 0.0
        if IS_PROMPT:
            g = tl.load(G + b * sgb + h * sgh)
        dg = tl.zeros([BLOCK_M], tl.float32)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = b * smb + h * smh
        for start_m in range(lo_m, mid_m, BLOCK_M):
            dk, dv, dg = _dkdv_step(
                dk, dv, dg, k, v, q_base, do_base, HI, LO, DELTA, MASK, mask_base, row_base, start_m,
                offs_m, offs_d, d_ok, cols, c_ok, sqt, sdot, smt, T, S, g, qk_scale,
                MASK_KIND, IS_CAUSAL, IS_PROMPT, True, FP32, D_PAD,
            )  # fmt: skip
        if not IS_PROMPT:
            for start_m in range(mid_m, T, BLOCK_M):
                dk, dv, dg = _dkdv_step(
                    dk, dv, dg, k, v, q_base, do_base, HI, LO, DELTA, MASK, mask_base, row_base, start_m,
                    offs_m, offs_d, d_ok, cols, c_ok, sqt, sdot, smt, T, S, g, qk_scale,
                    MASK_KIND, IS_CAUSAL, IS_PROMPT, False, FP32, D_PAD,
                )  # fmt: skip
        if IS_PROMPT:
            tl.atomic_add(DGATE + b * sgb + h * sgh, tl.sum(dg, 0))
    dk = dk * sm_scale
    tl.store(
        _rows(DK + b * sdkb + hk * sdkh, cols, sdks, offs_d, D_PAD),
        dk.to(DK.dtype.element_ty),
        mask=kv_ok,
    )
    tl.store(
        _rows(DV + b * sdvb + hk * sdvh, cols, sdvs, offs_d, D_PAD),
        dv.to(DV.dtype.element_ty),
        mask=kv_ok,
    )


@triton.jit
def _gpa_bwd_dkdv_kernel(
    Q, K, V, PK, PV, G, MASK, DO, HI, LO, DELTA, DK, DV, DPK, DPV, DGATE,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sdob, sdoh, sdot,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    sdpkb, sdpkh, sdpkp, sdpvb, sdpvh, sdpvp, sgb, sgh,
    H, GROUP, T, S, P, qk_scale, sm_scale,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FAST: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NP: tl.constexpr,
):  # fmt: skip
    """One launch for both key segments: per (b, kv head), programs 0 .. cdiv(P, BLOCK_NP) - 1 take the
    prompt key blocks (dprompt_key/value per batch item, dgate atomically added to DGATE, which the
    preprocess zeroed), the next cdiv(S, BLOCK_N) the key blocks (dk, dv written once)."""
    n_p = tl.cdiv(P, BLOCK_NP)
    pid_n, _, b, hk = _split_pid(n_p + tl.cdiv(S, BLOCK_N), H // GROUP)
    if pid_n < n_p:
        _dkdv_block(
            Q, PK, PV, G, MASK, DO, HI, LO, DELTA, DPK, DPV, DGATE, b, hk, pid_n,
            sqb, sqh, sqt, spkb, spkh, spkp, spvb, spvh, spvp, 0, 0, 0, sdob, sdoh, sdot,
            sdpkb, sdpkh, sdpkp, sdpvb, sdpvh, sdpvp, sgb, sgh, H, GROUP, T, S, P, qk_scale, sm_scale,
            HEAD_DIM, D_PAD, EVEN_D, 0, False, True, FAST, FP32, BLOCK_M, BLOCK_NP,
        )  # fmt: skip
    else:
        _dkdv_block(
            Q, K, V, G, MASK, DO, HI, LO, DELTA, DK, DV, DGATE, b, hk, pid_n - n_p,
            sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sdob, sdoh, sdot,
            sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sgb, sgh, H, GROUP, T, S, S, qk_scale, sm_scale,
            HEAD_DIM, D_PAD, EVEN_D, MASK_KIND, IS_CAUSAL, False, FAST, FP32, BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _gpa_bwd_dq_kernel(
    Q, K, V, PK, PV, G, MASK, DO, HI, LO, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, sgb, sgh,
    H, GROUP, T, S, P, qk_scale, sm_scale,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FAST: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, b, h = _split_pid(tl.cdiv(T, BLOCK_M), H)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = _head_ok(offs_d, HEAD_DIM, D_PAD, EVEN_D)
    r_ok = rows < T
    qo_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q + b * sqb + h * sqh, rows, sqt, offs_d, D_PAD), mask=qo_ok, other=0.0)
    do = tl.load(_rows(DO + b * sdob + h * sdoh, rows, sdot, offs_d, D_PAD), mask=qo_ok, other=0.0)
    row_base = pid_bh.to(tl.int64) * T
    hi = tl.load(HI + row_base + rows, mask=r_ok, other=float("inf"))
    lo = tl.load(LO + row_base + rows, mask=r_ok, other=0.0)
    delta = tl.load(DELTA + row_base + rows, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    g = tl.load(G + b * sgb + h * sgh)
    log2g = tl.log2(tl.where(g > 0, g, 1.0))  # used only when g > 0
    p_end = tl.where(g > 0, P, 0)
    pk_base = PK + b * spkb + hk * spkh
    pv_base = PV + b * spvb + hk * spvh
    for start in range(0, p_end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < P
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(_rows(pk_base, cols, spkp, offs_d, D_PAD), mask=kv_ok, other=0.0)
        v = tl.load(_rows(pv_base, cols, spvp, offs_d, D_PAD), mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale + log2g
        s = tl.where(c_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - hi[:, None])  # (lo is 0 on rows with prompt weight)
        ds = p * (_dot(do, tl.trans(v), FP32) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32)

    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = b * smb + h * smh
    end = _causal_key_end(pid_m, S, T, BLOCK_M, IS_CAUSAL)
    mid = 0
    if FAST and MASK_KIND == 0:
        # Whole key blocks below the diagonal: no mask/causal ``where`` (lo is 0 without a mask;
        # rows past T have hi = +inf, so p = 0 there).
        mid = _unmasked_key_end(pid_m, S, T, BLOCK_M, BLOCK_N, IS_CAUSAL)
        for start in range(0, mid, BLOCK_N):
            cols = start + offs_n
            k = _load_rows(_rows(k_base, cols, sks, offs_d, D_PAD), r_ok, d_ok, True, EVEN_D)
            v = _load_rows(_rows(v_base, cols, svs, offs_d, D_PAD), r_ok, d_ok, True, EVEN_D)
            s = _dot(q, tl.trans(k), FP32) * qk_scale
            p = tl.exp2(s - hi[:, None])
            ds = p * (_dot(do, tl.trans(v), FP32) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, FP32)
    for start in range(mid, end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < S
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(_rows(k_base, cols, sks, offs_d, D_PAD), mask=kv_ok, other=0.0)
        v = tl.load(_rows(v_base, cols, svs, offs_d, D_PAD), mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale
        s = _mask_keys(s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND, IS_CAUSAL)
        p = tl.exp2(s - hi[:, None] - lo[:, None])
        ds = p * (_dot(do, tl.trans(v), FP32) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32)

    dq = dq * sm_scale
    tl.store(
        _rows(DQ + b * sdqb + h * sdqh, rows, sdqt, offs_d, D_PAD),
        dq.to(DQ.dtype.element_ty),
        mask=qo_ok,
    )


@triton.jit
def _key_block_probs(do, v, s, hi, lo, delta, MASK_KIND: tl.constexpr, FP32: tl.constexpr):
    """P [M, N] and dS = P * (dP - delta) of one key block, from its masked base-2 logits s [M, N],
    the rows' dO [M, D], normaliser hi + lo and delta, and the keys' values v [N, D]."""
    if MASK_KIND == 2:  # (lo is 0 unless an additive mask saturates the row)
        p = tl.exp2(s - hi[:, None] - lo[:, None])
    else:
        p = tl.exp2(s - hi[:, None])
    return p, p * (_dot(do, tl.trans(v), FP32) - delta[:, None])


@triton.jit
def _prompt_block_probs(q, do, pk, pv, c_ok, hi, delta, g, qk_scale, FP32: tl.constexpr):
    """P = g * pu [M, N] and dS of one prompt block (keys pk, pv [N, D], c_ok: the ones that exist)
    at gate g (a scalar, or [M, 1] per row), and the rows' dgate terms pu * (dP - delta) [M]: pu is the
    ungated probability, its exponent clamped as in the dk/dv kernel, so the terms are finite at
    gate 0."""
    sp = _dot(q, tl.trans(pk), FP32) * qk_scale
    sp = tl.where(c_ok[None, :], sp, float("-inf"))
    pu = tl.exp2(tl.minimum(sp - hi[:, None], _EXP2_CLAMP))
    pp = pu * g
    dpp = _dot(do, tl.trans(pv), FP32) - delta[:, None]
    return pp, pp * dpp, tl.sum(pu * dpp, 1)


@triton.jit
def _gpa_bwd_fused_kernel(
    Q, K, V, PK, PV, G, MASK, DO, OUT, LSE, DQ, DK, DV, DPK, DPV, DGATE,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sdob, sdoh, sdot, sob, soh, sot,
    sdqb, sdqh, sdqt, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    sdpkb, sdpkh, sdpkp, sdpvb, sdpvh, sdpvp, sgb, sgh,
    H, GROUP, T, S, P, qk_scale, sm_scale,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr,
):  # fmt: skip
    """The whole backward of one (b, kv head) whose keys fit one block each (S <= BLOCK_N keys,
    P <= BLOCK_NP): the program holds k, v, pk, pv and loops over the query heads of the group and
    their query blocks. Per query block it computes what the preprocess computes (delta = rowsum(dO *
    O), the base-2 normaliser hi + lo, the saturated keys counted on the block's own logits), then
    the five products of the floor per segment (S = Q K^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q,
    dQ = dS K): dq is complete (every key is in the program) and written once, q, dO and out are
    read once; dk, dv and the prompt's accumulate over the group's query heads and are written once,
    dgate terms (as in the dk/dv kernel) are added atomically to DGATE (zeroed by the launcher)."""
    _, _, b, hk = _split_pid(1, H // GROUP)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = _head_ok(offs_d, HEAD_DIM, D_PAD, EVEN_D)
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < S
    kv_ok = c_ok[:, None] & d_ok[None, :]
    k = tl.load(_rows(K + b * skb + hk * skh, cols, sks, offs_d, D_PAD), mask=kv_ok, other=0.0)
    v = tl.load(_rows(V + b * svb + hk * svh, cols, svs, offs_d, D_PAD), mask=kv_ok, other=0.0)
    pcols = tl.arange(0, BLOCK_NP)
    pc_ok = pcols < P
    pkv_ok = pc_ok[:, None] & d_ok[None, :]
    pk = tl.load(_rows(PK + b * spkb + hk * spkh, pcols, spkp, offs_d, D_PAD), mask=pkv_ok, other=0.0)
    pv = tl.load(_rows(PV + b * spvb + hk * spvh, pcols, spvp, offs_d, D_PAD), mask=pkv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dpk = tl.zeros([BLOCK_NP, D_PAD], tl.float32)
    dpv = tl.zeros([BLOCK_NP, D_PAD], tl.float32)
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        row_base = (b * H + h) * T
        g = tl.load(G + b * sgb + h * sgh)
        dg = tl.zeros([BLOCK_M], tl.float32)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        o_base = OUT + b * sob + h * soh
        dq_base = DQ + b * sdqb + h * sdqh
        mask_base = b * smb + h * smh
        for start_m in range(0, T, BLOCK_M):
            rows = start_m + offs_m
            r_ok = rows < T
            qo_ok = r_ok[:, None] & d_ok[None, :]
            q = tl.load(_rows(q_base, rows, sqt, offs_d, D_PAD), mask=qo_ok, other=0.0)
            do = tl.load(_rows(do_base, rows, sdot, offs_d, D_PAD), mask=qo_ok, other=0.0)
            o = tl.load(_rows(o_base, rows, sot, offs_d, D_PAD), mask=qo_ok, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            # Rows past T: lse = +inf, hi = +inf, so p = pu = 0 there (q = dO = 0 too).
            lse = tl.load(LSE + row_base + rows, mask=r_ok, other=float("inf"))
            saturated = lse < _SAT_LSE
            hi = tl.where(saturated, _NEG_MAX, lse * _LOG2E)

            # Key segment.
            s = _dot(q, tl.trans(k), FP32) * qk_scale
            s = _mask_keys(s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND, IS_CAUSAL)
            lo = hi  # (read only with an additive mask)
            if MASK_KIND == 2:
                # A saturated key's logit is -FLT_MAX exactly (module docstring); hidden keys are -inf.
                count = tl.sum((s == _NEG_MAX).to(tl.int32), 1)
                lo = tl.where(saturated, tl.log2(tl.maximum(count, 1).to(tl.float32)), 0.0)
            p, ds = _key_block_probs(do, v, s, hi, lo, delta, MASK_KIND, FP32)
            dv += _dot(tl.trans(p.to(do.dtype)), do, FP32)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32)
            dq = _dot(ds.to(k.dtype), k, FP32)

            # Prompt segment.
            pp, dsp, dg_t = _prompt_block_probs(q, do, pk, pv, pc_ok, hi, delta, g, qk_scale, FP32)
            dg += dg_t
            dpv += _dot(tl.trans(pp.to(do.dtype)), do, FP32)
            dpk += _dot(tl.trans(dsp.to(q.dtype)), q, FP32)
            dq += _dot(dsp.to(pk.dtype), pk, FP32)
            dq = dq * sm_scale
            tl.store(_rows(dq_base, rows, sdqt, offs_d, D_PAD), dq.to(DQ.dtype.element_ty), mask=qo_ok)
        tl.atomic_add(DGATE + b * sgb + h * sgh, tl.sum(dg, 0))
    dk = dk * sm_scale
    dpk = dpk * sm_scale
    tl.store(
        _rows(DK + b * sdkb + hk * sdkh, cols, sdks, offs_d, D_PAD), dk.to(DK.dtype.element_ty), mask=kv_ok
    )
    tl.store(
        _rows(DV + b * sdvb + hk * sdvh, cols, sdvs, offs_d, D_PAD), dv.to(DV.dtype.element_ty), mask=kv_ok
    )
    tl.store(
        _rows(DPK + b * sdpkb + hk * sdpkh, pcols, sdpkp, offs_d, D_PAD),
        dpk.to(DPK.dtype.element_ty),
        mask=pkv_ok,
    )
    tl.store(
        _rows(DPV + b * sdpvb + hk * sdpvh, pcols, sdpvp, offs_d, D_PAD),
        dpv.to(DPV.dtype.element_ty),
        mask=pkv_ok,
    )


@triton.jit
def _gpa_bwd_rows_kernel(
    Q, K, V, PK, PV, G, MASK, DO, OUT, LSE, DQ, DK, DV, DPK, DPV, DGATE,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sdob, sdoh, sdot, sob, soh, sot,
    sdqb, sdqh, sdqt, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    sdpkb, sdpkh, sdpkp, sdpvb, sdpvh, sdpvp, sgb, sgh,
    H, GROUP, T, S, P, qk_scale, sm_scale,
    HEAD_DIM, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr,
):  # fmt: skip
    """The whole backward of one (b, kv head) whose group's query rows fit one block (GROUP * T <=
    BLOCK_M, packed query-major as in the forward): the program holds q, dO and the float32 dq of
    all of them, computes delta, hi and lo per row itself, and loops over the prompt key blocks
    (BLOCK_NP keys) and then the key blocks (BLOCK_N keys). Each key block's step does the five
    products of the floor (S = Q K^T, dP = dO V^T, dV = P^T dO, dK = dS^T Q, dQ += dS K), and its dk
    and dv (or the prompt's) are complete after it and written once; dq is written once at the end.
    Every input is read once. dgate terms (as in the dk/dv kernel) are summed per query head and
    added atomically to DGATE (zeroed by the launcher)."""
    _, _, b, hk = _split_pid(1, H // GROUP)
    r = tl.arange(0, BLOCK_M)
    t = r // GROUP
    r_ok = t < T
    h = hk * GROUP + (r % GROUP)  # int64 [BLOCK_M]: the query head of each row
    tt = t.to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = _head_ok(offs_d, HEAD_DIM, D_PAD, EVEN_D)
    qo_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q + b * sqb, h * sqh + tt * sqt, 1, offs_d, D_PAD), mask=qo_ok, other=0.0)
    do = tl.load(_rows(DO + b * sdob, h * sdoh + tt * sdot, 1, offs_d, D_PAD), mask=qo_ok, other=0.0)
    o = tl.load(_rows(OUT + b * sob, h * soh + tt * sot, 1, offs_d, D_PAD), mask=qo_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    # Rows past T: lse = +inf, hi = +inf, so p = pu = 0 there (q = dO = 0 too).
    lse = tl.load(LSE + (b * H + h) * T + t, mask=r_ok, other=float("inf"))
    saturated = lse < _SAT_LSE
    hi = tl.where(saturated, _NEG_MAX, lse * _LOG2E)
    if MASK_KIND == 2:  # additive [B, 1 or H, T, S]: each row's own offset (smh = 0 when broadcast)
        mask_base = (b * smb + h * smh + tt * smt)[:, None]
    else:  # key padding [B, S] (or none)
        mask_base = b * smb
    offs_n = tl.arange(0, BLOCK_N)
    lo = tl.zeros([BLOCK_M], tl.float32)
    if MASK_KIND == 2:
        # Saturated rows (only an additive mask saturates keys) need their count of saturated keys
        # before any probability: one pass over the mask, only when the block has such a row.
        n_saturated = tl.sum(saturated.to(tl.int32), 0)
        count = tl.zeros([BLOCK_M], tl.int32)
        for start in range(0, tl.where(n_saturated > 0, S, 0), BLOCK_N):
            cols = start + offs_n
            c_ok = cols < S
            s0 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            s0 = _mask_keys(s0, MASK, mask_base, t, cols, r_ok, c_ok, 0, S, T, MASK_KIND, IS_CAUSAL)
            count += tl.sum((s0 == _NEG_MAX).to(tl.int32), 1)
        lo = tl.where(saturated, tl.log2(tl.maximum(count, 1).to(tl.float32)), 0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Prompt segment: the ungated probability pu (exponent clamped as in the dk/dv kernel),
    # p = gate * pu, and the dgate terms pu * (dP - delta), finite at gate 0.
    g = tl.load(G + b * sgb + h * sgh, mask=r_ok, other=0.0)
    dg = tl.zeros([BLOCK_M], tl.float32)
    offs_p = tl.arange(0, BLOCK_NP)
    pk_base = PK + b * spkb + hk * spkh
    pv_base = PV + b * spvb + hk * spvh
    for start in range(0, P, BLOCK_NP):
        cols = start + offs_p
        c_ok = cols < P
        kv_ok = c_ok[:, None] & d_ok[None, :]
        pk = tl.load(_rows(pk_base, cols, spkp, offs_d, D_PAD), mask=kv_ok, other=0.0)
        pv = tl.load(_rows(pv_base, cols, spvp, offs_d, D_PAD), mask=kv_ok, other=0.0)
        pp, dsp, dg_t = _prompt_block_probs(q, do, pk, pv, c_ok, hi, delta, g[:, None], qk_scale, FP32)
        dg += dg_t
        dpv = _dot(tl.trans(pp.to(do.dtype)), do, FP32)
        dpk = _dot(tl.trans(dsp.to(q.dtype)), q, FP32) * sm_scale
        dq += _dot(dsp.to(pk.dtype), pk, FP32)
        tl.store(
            _rows(DPK + b * sdpkb + hk * sdpkh, cols, sdpkp, offs_d, D_PAD),
            dpk.to(DPK.dtype.element_ty),
            mask=kv_ok,
        )
        tl.store(
            _rows(DPV + b * sdpvb + hk * sdpvh, cols, sdpvp, offs_d, D_PAD),
            dpv.to(DPV.dtype.element_ty),
            mask=kv_ok,
        )
    for j in range(0, GROUP):  # one atomic add per query head of the group
        tl.atomic_add(
            DGATE + b * sgb + (hk * GROUP + j) * sgh, tl.sum(tl.where((r % GROUP) == j, dg, 0.0), 0)
        )

    # Key segment.
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for start in range(0, S, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < S
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(_rows(k_base, cols, sks, offs_d, D_PAD), mask=kv_ok, other=0.0)
        v = tl.load(_rows(v_base, cols, svs, offs_d, D_PAD), mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale
        s = _mask_keys(s, MASK, mask_base, t, cols, r_ok, c_ok, 0, S, T, MASK_KIND, IS_CAUSAL)
        p, ds = _key_block_probs(do, v, s, hi, lo, delta, MASK_KIND, FP32)
        dv = _dot(tl.trans(p.to(do.dtype)), do, FP32)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, FP32) * sm_scale
        dq += _dot(ds.to(k.dtype), k, FP32)
        tl.store(
            _rows(DK + b * sdkb + hk * sdkh, cols, sdks, offs_d, D_PAD),
            dk.to(DK.dtype.element_ty),
            mask=kv_ok,
        )
        tl.store(
            _rows(DV + b * sdvb + hk * sdvh, cols, sdvs, offs_d, D_PAD),
            dv.to(DV.dtype.element_ty),
            mask=kv_ok,
        )
    dq = dq * sm_scale
    tl.store(
        _rows(DQ + b * sdqb, h * sdqh + tt * sdqt, 1, offs_d, D_PAD), dq.to(DQ.dtype.element_ty), mask=qo_ok
    )


# ----------------------------------------------------------------------------------------------
# Configurations: per-architecture tile tables (the launchers choose among exactly these; the
# compile specs register exactly these)

_override_blocks: tuple[int, int] | None = None
_fast_path = True


@contextlib.contextmanager
def _switched(flag: str, enabled: bool):
    """Set the module flag ``flag`` to ``enabled`` for the block (the test switches below)."""
    old, globals()[flag] = globals()[flag], bool(enabled)
    try:
        yield
    finally:
        globals()[flag] = old


def fast_path(enabled: bool):
    """Tests only: with ``False`` every key block takes the masked path (the ``FAST`` constexpr), to
    compare the unmasked fast path of the blocks below the causal diagonal with it."""
    return _switched("_fast_path", enabled)


@contextlib.contextmanager
def force_blocks(block_m: int, block_n: int):
    """Tests only: run every kernel with these block sizes (small blocks exercise the multi-block
    loops at interpreter-friendly sizes), never autotuned. Block sizes below 16 are valid only under
    the interpreter."""
    global _override_blocks
    old, _override_blocks = _override_blocks, (block_m, block_n)
    try:
        yield
    finally:
        _override_blocks = old


def d_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def even_d(head_dim: int) -> bool:
    """EVEN_D: the head fills its padded width, so no column mask. The head sizes padded to 128 (80,
    96 and 128) all take the masked code, so that the three share one compile per tile (HEAD_DIM is a
    runtime argument; divisible by 16, its column mask is constant over 16 columns and the loads stay
    16-byte vectors: the same ld.global.v4 and cp.async counts as with a constexpr head size)."""
    return head_dim == d_pad(head_dim) < 128


KERNELS = ("fwd", "pre", "dkdv", "dq")
PROMPT_BLOCK_N = 64  # the dk/dv launch's prompt key blocks: at most this many keys (P is often small)
ARCHS = TABLE_ARCHS  # (80, 90): the architectures with their own rows (the compile check's)

# arch -> dtype class -> padded head size (80 and 96 use 128) -> kernel -> candidates
# (BLOCK_M, BLOCK_N, num_warps, num_stages), the fixed tile first. Chosen with the compile check
# (``compile_check --filter gpa_``: ptxas -v registers and spills, shared memory, occupancy, MMA kind,
# cp.async) on the heaviest variant (additive [B, H, T, S] mask tile + causal compare); the table and
# the reason per row are in benchmarks/notes/gated_prefix_attention.md. The first candidates are the
# tiles of before the tables (2026-12-04); further candidates only where they compile clean on that
# architecture: no spills, HMMA (sm_80) / HGMMA (sm_90) at fp16/bf16, cp.async in the pipelined
# loops. fp32 (IEEE dots on the FMA units with their operands in registers: the CPU tests' dtype,
# several tiles near 255 registers or known to spill) keeps one tile per head size everywhere.
_FP32_ROW = {
    32: {"fwd": ((64, 32, 4, 2),), "dkdv": ((16, 32, 4, 1),), "dq": ((32, 32, 8, 1),)},
    64: {"fwd": ((32, 32, 8, 1),), "dkdv": ((32, 32, 8, 1),), "dq": ((32, 32, 8, 2),)},
    128: {"fwd": ((16, 16, 4, 1),), "dkdv": ((16, 32, 8, 1),), "dq": ((16, 32, 8, 1),)},
}
_LOWP_80 = {
    32: {"fwd": ((128, 32, 8, 3),), "dkdv": ((32, 64, 8, 2),), "dq": ((128, 32, 8, 2),)},
    # Dh 64: the forward and dq also offer 64 x 32 tiles on 4 warps (136 and 168 registers per thread,
    # 3 CTAs per SM: 19 % occupancy against 12 %; twice the programs for short sequences); every other
    # dk/dv tile spills (16 x 32 and 32 x 32 on 4 warps, 32 x 64 on 8; the fixed one sits at 255).
    64: {
        "fwd": ((128, 64, 8, 3), (64, 32, 4, 3)),
        "dkdv": ((16, 64, 8, 2),),
        "dq": ((128, 32, 8, 2), (64, 32, 4, 2)),
    },
    128: {"fwd": ((64, 32, 4, 3),), "dkdv": ((32, 32, 8, 2),), "dq": ((64, 32, 8, 2),)},
}
# sm_90: dk/dv tiles of 128 keys (64 at Dh 128), wgmma's 64 rows per warpgroup (the keys are the M
# dimension of every dk/dv tl.dot, see _dkdv_step); at Dh 64 also 16 x 128 (HGMMA, 168 registers
# against 194: the query step halved, finer causal start); forward and dq as sm_80 (64 x 32 on 4
# warps: 120 and 128 registers, 25 % occupancy against 12 % and 25 %).
_LOWP_90 = {
    32: {**_LOWP_80[32], "dkdv": ((32, 128, 8, 2),)},
    64: {**_LOWP_80[64], "dkdv": ((32, 128, 8, 2), (16, 128, 8, 2))},
    128: {**_LOWP_80[128], "dkdv": ((32, 64, 8, 2),)},
}
TILE_TABLE = {
    80: {"lowp": _LOWP_80, "fp32": _FP32_ROW},
    90: {"lowp": _LOWP_90, "fp32": _FP32_ROW},
    DEFAULT_ARCH: {"lowp": _LOWP_80, "fp32": _FP32_ROW},  # other GPUs and the interpreter: sm_80's
}
_PRE_CONFIG = (64, 64, 4, 1)  # BLOCK_N: the mask tiles read on saturated rows; memory-bound, one tile


def _tile(kernel: str, bm: int, bn: int, warps: int, stages: int | None) -> TileConfig:
    if kernel == "dkdv":
        return TileConfig.of(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_NP=min(bn, PROMPT_BLOCK_N))
    return TileConfig.of(warps, stages, BLOCK_M=bm, BLOCK_N=bn)


def candidates(kernel: str, arch: int, dtype: torch.dtype, head_dim: int) -> tuple[TileConfig, ...]:
    """The tiles ``kernel`` (``fwd``, ``pre``, ``dkdv``, ``dq``) may launch with on ``arch`` (80, 90;
    anything else, and ``DEFAULT_ARCH`` for the interpreter, gets the default row, sm_80's) for a dtype
    and head size, the fixed one first. ``dkdv`` is the one dk/dv launch over both key segments (prompt
    blocks of ``BLOCK_NP = min(BLOCK_N, PROMPT_BLOCK_N)`` keys)."""
    if kernel == "pre":
        return (_tile(kernel, *_PRE_CONFIG),)
    cls = "fp32" if dtype == torch.float32 else "lowp"
    rows = arch_row(TILE_TABLE, arch)[cls][max(32, d_pad(head_dim))][kernel]
    return tuple(_tile(kernel, *row) for row in rows)


def configs(
    dtype: torch.dtype, head_dim: int, arch: int = DEFAULT_ARCH
) -> dict[str, tuple[int, int, int, int]]:
    """``kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the fixed (first) candidate per kernel:
    what the interpreter and the compile check launch."""
    out = {}
    for kernel in KERNELS:
        c = candidates(kernel, arch, dtype, head_dim)[0]
        out[kernel] = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    return out


def _launch_candidates(kernel: str, device, dtype: torch.dtype, head_dim: int) -> tuple[TileConfig, ...]:
    cands = candidates(kernel, launch_arch(device), dtype, head_dim)
    if _override_blocks is None:
        return cands
    c = cands[0]
    return (
        _tile(
            kernel, _override_blocks[0], _override_blocks[1] or c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        ),
    )


# The fused backward (_gpa_bwd_fused_kernel: one launch, one program per (b, kv head) holding all its
# keys) where the S keys fit one key block and the P prompt keys one prompt block: per architecture
# and padded head size (BLOCK_M, fewest and most keys BLOCK_N, most prompt keys BLOCK_NP, num_warps,
# num_stages); the launch takes BLOCK_N = next_power_of_2(S) (at least the fewest) and BLOCK_NP =
# next_power_of_2(P) (at least 16, tl.dot's minimum), so that padding stays below 2x. Chosen with the
# compile check (``fused_tiles`` are its specs; ``compile_check --filter gpa_bwd_fused``): the
# program holds k, v, pk, pv and the float32 dk, dv, dpk, dpv, so the rows are the largest that
# compile without spills on 8 (4 at Dh 32) warps, unpipelined (the query loop pipelined at 2 stages
# spills everywhere). sm_90: at least 64 keys (the dk/dv products' M dimension: wgmma's 64 rows, HGMMA;
# with 16-32 keys and 16-32 queries no product reaches it and sm_90 would run HMMA); at Dh 80-128
# prompt blocks of 16 (32 spills 24 B). sm_80 at Dh 80-128: up to 32 keys (64 spill 108 B at 16
# queries). fp16/bf16 only on GPUs: fp32 IEEE dots on the FMA units keep their operands in registers
# and spill 100 B to 3 KB at every tile tried (Dh 32-64, 16-64 keys); the interpreter (the CPU tests'
# dtype) runs fp32 with the default row's tiles, the same kernel code as fp16. At least 32 keys and
# at most 32 prompt keys (16- and 64-wide blocks compiled clean too): each (BLOCK_N, BLOCK_NP) is a
# compile of the check's, whose cold run must stay under 3 minutes; 16 keys saved flops only on
# sequences of 16 tokens or fewer, and 33-64 prompt keys take the rows backward or the three launches.
_FUSED_LOWP_80 = {32: (16, 32, 64, 32, 4, 1), 64: (32, 32, 64, 32, 8, 1), 128: (16, 32, 32, 32, 8, 1)}
_FUSED_LOWP_90 = {32: (16, 64, 64, 32, 4, 1), 64: (32, 64, 64, 32, 8, 1), 128: (16, 64, 64, 16, 8, 1)}
FUSED_TABLE = {80: _FUSED_LOWP_80, 90: _FUSED_LOWP_90, DEFAULT_ARCH: _FUSED_LOWP_80}
_short_path = True


def short_path(enabled: bool):
    """Tests only: with ``False`` the backward never takes the fused short-key-range path."""
    return _switched("_short_path", enabled)


def _fused_row(arch: int, dtype: torch.dtype, head_dim: int):
    if dtype == torch.float32 and not (arch == DEFAULT_ARCH and interpreting()):
        return None
    return arch_row(FUSED_TABLE, arch).get(max(32, d_pad(head_dim)))


def _key_block(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def fused_tile(arch: int, dtype: torch.dtype, head_dim: int, S: int, P: int) -> TileConfig | None:
    """The fused backward's tile for S keys and P prompt keys on ``arch``, or None where the keys do
    not fit one block (or the table has no fused row for the dtype and head size)."""
    row = _fused_row(arch, dtype, head_dim)
    if row is None or _key_block(S) > row[2] or _key_block(P) > row[3]:
        return None
    bm, fewest, _, _, warps, stages = row
    return TileConfig.of(
        warps, stages, BLOCK_M=bm, BLOCK_N=max(_key_block(S), fewest), BLOCK_NP=_key_block(P)
    )


def fused_tiles(arch: int, dtype: torch.dtype, head_dim: int) -> tuple[TileConfig, ...]:
    """Every tile the fused backward can launch with on ``arch`` (the compile specs), the largest first."""
    row = _fused_row(arch, dtype, head_dim)
    if row is None:
        return ()
    sizes = lambda fewest, most: [n for n in (128, 64, 32, 16) if fewest <= n <= most]
    return tuple(
        fused_tile(arch, dtype, head_dim, s, p) for s in sizes(row[1], row[2]) for p in sizes(16, row[3])
    )


def _backward_path(arch: int, dtype: torch.dtype, head_dim: int, group: int, T: int, S: int, P: int) -> str:
    """Which backward ``arch``'s tables choose: ``fused`` (short key ranges), ``rows`` (short query
    ranges) or ``three launches``."""
    if fused_tile(arch, dtype, head_dim, S, P) is not None:
        return "fused"
    if rows_tile(arch, dtype, head_dim, group * T) is not None:
        return "rows"
    return "three launches"


def _fused_launch_tile(device, dtype: torch.dtype, head_dim: int, S: int, P: int) -> TileConfig | None:
    if not _short_path:
        return None
    tile = fused_tile(launch_arch(device), dtype, head_dim, S, P)
    if tile is None or _override_blocks is None:
        return tile
    return TileConfig.of(tile.num_warps, tile.num_stages, **{**tile.kwargs, "BLOCK_M": _override_blocks[0]})


# The rows backward (_gpa_bwd_rows_kernel: one launch, one program per (b, kv head) holding all the
# group's query rows) where the S keys do not fit the fused backward's one block but the GROUP * T
# packed query rows fit one block of rows: per architecture and padded head size (fewest and most
# rows BLOCK_M, BLOCK_N, num_warps, num_stages). The launch takes BLOCK_M = next_power_of_2(GROUP * T)
# (at least the fewest) and prompt blocks of ROWS_BLOCK_NP keys (P is often small: 5-20). Chosen with
# the compile check (``rows_tiles`` are its specs; ``compile_check --filter gpa_bwd_rows``): the
# largest rows that compile without spills; the key loop pipelined at 2 stages (cp.async), which also
# lowered registers (sm_80 Dh 32 at 128 rows 255 -> 187) and let sm_90 take 64 keys at Dh 80-128
# (1 stage spilled 124 B). The program holds q, dO (as both operands of the products) and the float32
# dq: sm_80 at Dh 64 reaches 64 rows on 4 warps only (128 rows spill 20-356 B at 1 or 2 stages, 32 or
# 64 keys, 8 or 16 warps); sm_90 128 rows at Dh 32-64, 64 keys everywhere (wgmma's 64 rows are the
# keys in the dk/dv products: HGMMA). fp32 (IEEE dots on the FMA units, 1 stage) to 64 rows at Dh 32
# and 32 at Dh 64; every fp32 tile at Dh 80-128 spills (970-1070 B at 32 x 16): those take the three
# launches. At fp16/bf16 at least 64 rows (32-row tiles compile clean too, but each tile is a compile
# of the check's: fewer than 64 rows with more keys than the fused backward takes are rare).
ROWS_BLOCK_NP = 16
_ROWS_LOWP_80 = {32: (64, 128, 64, 8, 2), 64: (64, 64, 32, 4, 2), 128: (64, 64, 32, 8, 2)}
_ROWS_LOWP_90 = {32: (64, 128, 64, 8, 2), 64: (64, 128, 64, 8, 2), 128: (64, 64, 64, 8, 2)}
_ROWS_FP32 = {32: (32, 64, 32, 4, 1), 64: (32, 32, 16, 4, 1)}
ROWS_TABLE = {
    80: {"lowp": _ROWS_LOWP_80, "fp32": _ROWS_FP32},
    90: {"lowp": _ROWS_LOWP_90, "fp32": _ROWS_FP32},
    DEFAULT_ARCH: {"lowp": _ROWS_LOWP_80, "fp32": _ROWS_FP32},
}
_rows_path = True


def rows_path(enabled: bool):
    """Tests only: with ``False`` the backward never takes the rows path (short query ranges)."""
    return _switched("_rows_path", enabled)


def _rows_row(arch: int, dtype: torch.dtype, head_dim: int):
    cls = "fp32" if dtype == torch.float32 else "lowp"
    return arch_row(ROWS_TABLE, arch)[cls].get(max(32, d_pad(head_dim)))


def rows_tile(arch: int, dtype: torch.dtype, head_dim: int, rows: int) -> TileConfig | None:
    """The rows backward's tile for ``rows`` = GROUP * T packed query rows on ``arch``, or None where
    they do not fit one block (or the table has no row for the dtype and head size)."""
    row = _rows_row(arch, dtype, head_dim)
    if row is None:
        return None
    fewest, most, bn, warps, stages = row
    bm = max(fewest, triton.next_power_of_2(max(int(rows), 1)))
    if bm > most:
        return None
    return TileConfig.of(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_NP=ROWS_BLOCK_NP)


def rows_tiles(arch: int, dtype: torch.dtype, head_dim: int) -> tuple[TileConfig, ...]:
    """Every tile the rows backward can launch with on ``arch`` (the compile specs), the largest first."""
    row = _rows_row(arch, dtype, head_dim)
    if row is None:
        return ()
    return tuple(rows_tile(arch, dtype, head_dim, n) for n in (128, 64, 32) if row[0] <= n <= row[1])


def _rows_launch_tile(device, dtype: torch.dtype, head_dim: int, rows: int) -> TileConfig | None:
    if not _rows_path:
        return None
    tile = rows_tile(launch_arch(device), dtype, head_dim, rows)
    if tile is None or _override_blocks is None:
        return tile
    kw = {**tile.kwargs, "BLOCK_N": _override_blocks[1] or tile.kwargs["BLOCK_N"]}
    return TileConfig.of(tile.num_warps, tile.num_stages, **kw)


# Autotuning on GPUs (registry.TunedKernel; never under the interpreter or the compile check, which
# launch the first candidate; nor with PROMPT_KERNELS_AUTOTUNE=0). Triton's key: the constexprs that
# change the kernel's work per tile (head size, mask kind, causality; for dk/dv GROUP, the query heads
# each program loops over) and, added by Triton, every tensor's dtype. The lengths decide the best tile too (programs per wave, loop trip
# counts), but change from batch to batch: they select one autotuner per power-of-two bucket of
# (T, S, P, programs' batch x heads; the forward's: the group's packed rows GROUP * T, S, P, batch x
# kv heads), so a new length within a bucket launches the bucket's pick
# without benchmarking again. Autotuned: the forward and dq (their outputs written once, nothing
# read back) and dk/dv with reset_to_zero=["DGATE"] (its prompt programs atomically add into dgate,
# which the preprocess zeroes: Triton zeroes it before every benchmarked run and again before the
# launch of the pick, so every trial and the result are right). Not autotuned: the preprocess (one
# memory-bound tile).
_TUNE_KEYS = {
    "fwd": ["HEAD_DIM", "MASK_KIND", "IS_CAUSAL"],
    "pre": ["HEAD_DIM", "MASK_KIND", "IS_CAUSAL"],
    "dkdv": ["HEAD_DIM", "MASK_KIND", "IS_CAUSAL", "GROUP"],
    "dq": ["HEAD_DIM", "MASK_KIND", "IS_CAUSAL"],
    "fused": ["HEAD_DIM", "MASK_KIND", "IS_CAUSAL", "GROUP"],
    "rows": ["HEAD_DIM", "MASK_KIND", "IS_CAUSAL", "GROUP"],
}
_KERNEL_NAMES = {
    "fwd": "_gpa_fwd_kernel",
    "pre": "_gpa_bwd_preprocess_kernel",
    "dkdv": "_gpa_bwd_dkdv_kernel",
    "dq": "_gpa_bwd_dq_kernel",
}
# (the fused backward's tiles come from FUSED_TABLE by S and P, not from ``candidates``)
_ALL_KERNEL_NAMES = {**_KERNEL_NAMES, "fused": "_gpa_bwd_fused_kernel", "rows": "_gpa_bwd_rows_kernel"}
_RESET_TO_ZERO = {"dkdv": ["DGATE"]}
_tuned: dict[tuple, TunedKernel] = {}
_do_bench = None  # None: Triton's timer (the GPU's); tests pass a stand-in


def _length_bucket(*sizes: int) -> tuple[int, ...]:
    return tuple(triton.next_power_of_2(max(int(n), 1)) for n in sizes)


def tuned_kernel(kernel: str, bucket: tuple[int, ...] = ()) -> TunedKernel:
    """The TunedKernel of ``kernel`` for a length bucket (created on first use, around the module's
    kernel as it is now: tests swap in recorders)."""
    fn = globals()[_ALL_KERNEL_NAMES[kernel]]
    t = _tuned.get((kernel, bucket))
    if t is None or t.kernel is not fn:
        t = _tuned[(kernel, bucket)] = TunedKernel(
            fn, _TUNE_KEYS[kernel], reset_to_zero=_RESET_TO_ZERO.get(kernel), do_bench=_do_bench
        )
    return t


def _launch(kernel: str, grid, cands, *args, device, bucket: tuple[int, ...], **kwargs) -> TileConfig:
    """Launch ``kernel`` with ``grid(meta)``: candidates[0] under the interpreter, the compile check or
    with a single candidate, else the autotuner of the length bucket. Returns the tile used."""
    tuned = len(cands) > 1 and autotune_enabled(device)
    return tuned_kernel(kernel, bucket if tuned else ()).launch(grid, cands, *args, device=device, **kwargs)


# ----------------------------------------------------------------------------------------------
# Launchers


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this head size and dtype: the ones the compile specs cover (each
    row is then a whole number of 16-byte vectors, the alignment the loads are hinted with)."""
    return head_dim in HEAD_DIMS and dtype in DTYPES


def _is_aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(t.stride(i) * es % 16 == 0 for i in range(t.dim() - 1) if t.shape[i] > 1)
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit last stride and 16-byte aligned rows (the kernels' load hints rely on it)."""
    if t.numel() == 0 or _is_aligned(t):
        return t
    t = t.contiguous()
    if not _is_aligned(t):
        raise ValueError(f"rows of {t.shape[-1]} {t.dtype} elements cannot be 16-byte aligned")
    return t


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [N, heads, rows, Dh] tensor; size-1 batch or head -> 0."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def _prepare_mask(attention_mask, q: torch.Tensor, H: int):
    """-> (kind, tensor, (batch, head, row) strides)."""
    if attention_mask is None:
        return MASK_NONE, q, (0, 0, 0)
    if attention_mask.dtype == torch.bool:
        m = attention_mask.contiguous().view(torch.uint8)
        return MASK_BOOL, m, (m.stride(0), 0, 0)
    # The reference adds the mask in the query dtype: convert first, as it does.
    m = attention_mask.to(q.dtype)
    m = m if m.stride(-1) == 1 else m.contiguous()
    return MASK_ADDITIVE, m, (m.stride(0), 0 if m.shape[1] == 1 else m.stride(1), m.stride(2))


def _heads_last_empty(shape, dtype, device) -> torch.Tensor:
    N, heads, rows, Dh = shape
    return _alloc.empty((N, rows, heads, Dh), dtype=dtype, device=device).transpose(1, 2)


def _gate2(gate: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The gate as float32 [1 or B, 1 or H] (no copy for a contiguous float32 gate) and its (batch,
    head) strides, 0 along broadcast dimensions: the kernels read gate[b, h] and accumulate dgate into
    a tensor of the same shape and strides (no [B, H] copy, no host reduction to the gate's shape)."""
    g = gate.detach().to(torch.float32)
    g = g.reshape((1,) * (2 - g.dim()) + tuple(g.shape)).contiguous()
    return g, (0 if g.shape[0] == 1 else g.stride(0), 0 if g.shape[1] == 1 else g.stride(1))


def _grid(blocks: int, heads: int) -> tuple[int]:
    """The launch grid of ``blocks`` programs for each of ``heads`` (batch x head) pairs: all on axis
    x, which CUDA allows 2^31 - 1 programs (axes y and z: 65,535, fewer than B * H may be); the
    kernels split the program id as ``block = pid % blocks``, ``head = pid // blocks``."""
    n = blocks * heads
    if n > MAX_GRID_X:
        raise ValueError(
            f"{OP}: {blocks} blocks x {heads} (batch x head) pairs = {n} programs, over CUDA's grid "
            f"limit of {MAX_GRID_X}"
        )
    return (n,)


def forward(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal: bool, scale: float):
    """-> (out [B, H, T, Dh] in the query dtype, lse [B, H, T] float32)."""
    q, k, v, pk, pv = (_aligned(t) for t in (query, key, value, prompt_key, prompt_value))
    B, H, T, Dh = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[2]
    out = _alloc.empty((B, H, T, Dh), dtype=q.dtype, device=q.device)
    lse = _alloc.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out, lse
    kind, m, ms = _prepare_mask(attention_mask, q, H)
    g, gs = _gate2(gate)
    group = H // Hkv
    _launch(
        "fwd",
        lambda meta: _grid(triton.cdiv(group * T, meta["BLOCK_M"]), B * Hkv),
        _launch_candidates("fwd", q.device, q.dtype, Dh),
        q, k, v, pk, pv, g, m, out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(pk), *_strides3(pv),
        *ms, *_strides3(out), *gs,
        H, group, T, S, P, scale * LOG2E,
        HEAD_DIM=Dh, D_PAD=d_pad(Dh), EVEN_D=even_d(Dh), MASK_KIND=kind, IS_CAUSAL=bool(is_causal), FAST=_fast_path,
        FP32=q.dtype == torch.float32, device=q.device, bucket=_length_bucket(group * T, S, P, B * Hkv),
    )  # fmt: skip
    return out, lse


def backward(
    grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    """-> (dq, dk, dv, dprompt_key, dprompt_value, dgate float32 in the gate's shape as [1 or B, 1 or H]).

    dprompt_* have the prompt's batch size (summed over the batch when it was broadcast)."""
    q, k, v, pk, pv, do, o = (
        _aligned(t) for t in (query, key, value, prompt_key, prompt_value, grad_out.to(query.dtype), out)
    )
    lse = lse.contiguous()
    B, H, T, Dh = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[2]
    Bp = pk.shape[0]
    dev, dt = q.device, q.dtype
    # Gradients in the heads-last layout the custom op promises ([N, rows, heads, Dh] storage).
    dq, dk, dv = (_heads_last_empty(t.shape, dt, dev) for t in (q, k, v))
    g, gs = _gate2(gate)
    dgate = _alloc.empty(g.shape, dtype=torch.float32, device=dev)  # (g's strides: gs)
    if B * H * T == 0 or Dh == 0:
        for t in (dq, dk, dv, dgate):
            t.zero_()
        zp = torch.zeros(pk.shape, dtype=dt, device=dev)
        return dq, dk, dv, zp, zp.clone(), dgate
    kind, m, ms = _prepare_mask(attention_mask, q, H)
    dp_, fp32 = d_pad(Dh), dt == torch.float32
    group = H // Hkv
    common = dict(
        HEAD_DIM=Dh, D_PAD=dp_, EVEN_D=even_d(Dh), MASK_KIND=kind, IS_CAUSAL=bool(is_causal), device=dev
    )

    # Short key ranges (every key of a (b, kv head) in one block): the fused backward, one launch;
    # else short query ranges (the group's GROUP * T query rows in one block): the rows backward,
    # one launch. Both take the same arguments.
    one, fused = "fused", _fused_launch_tile(dev, dt, Dh, S, P)
    if fused is None:
        one, fused = "rows", _rows_launch_tile(dev, dt, Dh, group * T)
    if fused is None:
        # delta = rowsum(grad_out * out), the rows' normalisers in base 2 as hi + lo (module
        # docstring), dgate zeroed for the dk/dv launch's atomic adds
        delta, hi, lo = (_alloc.empty((B, H, T), dtype=torch.float32, device=dev) for _ in range(3))
        _launch(
            "pre",
            lambda meta: _grid(triton.cdiv(T, meta["BLOCK_M"]), B * H),
            _launch_candidates("pre", dev, dt, Dh),
            o, do, lse, m, delta, hi, lo, dgate, *_strides3(o), *_strides3(do), *ms, *gs, H, T, S,
            **common, bucket=(),
        )  # fmt: skip

    # dk, dv and the prompt's: one launch, prompt key blocks and key blocks as programs of one grid.
    # A broadcast prompt (batch 1, B > 1) gets float32 per-batch partials, summed over the batch here
    # (one reduction each, written in the input dtype); else dprompt_key/value are written directly.
    shared_prompt = Bp == 1 and B > 1 and P > 0
    if shared_prompt:
        part = _alloc.empty((2, B, Hkv, P, Dh), dtype=torch.float32, device=dev)
        dpk, dpv = part[0], part[1]
    else:
        dpk, dpv = (_alloc.empty(pk.shape, dtype=dt, device=dev) for _ in range(2))
    if fused is not None:
        dgate.zero_()  # (the fused and rows programs add their dgate terms atomically)
        _launch(
            one,
            lambda meta: _grid(1, B * Hkv),
            (fused,),
            q, k, v, pk, pv, g, m, do, o, lse, dq, dk, dv, dpk, dpv, dgate,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(pk), *_strides3(pv), *ms,
            *_strides3(do), *_strides3(o), *_strides3(dq), *_strides3(dk), *_strides3(dv),
            *_strides3(dpk), *_strides3(dpv), *gs,
            H, group, T, S, P, scale * LOG2E, scale,
            **common, FP32=fp32, bucket=(),
        )  # fmt: skip
    elif P + S > 0:
        _launch(
            "dkdv",
            lambda meta: _grid(triton.cdiv(P, meta["BLOCK_NP"]) + triton.cdiv(S, meta["BLOCK_N"]), B * Hkv),
            _launch_candidates("dkdv", dev, dt, Dh),
            q, k, v, pk, pv, g, m, do, hi, lo, delta, dk, dv, dpk, dpv, dgate,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(pk), *_strides3(pv), *ms,
            *_strides3(do), *_strides3(dk), *_strides3(dv), *_strides3(dpk), *_strides3(dpv), *gs,
            H, group, T, S, P, scale * LOG2E, scale,
            **common, FAST=_fast_path, FP32=fp32, bucket=_length_bucket(T, S, P, B * Hkv),
        )  # fmt: skip
    if shared_prompt:  # (two outputs: the custom op's gradients may not alias each other)
        dpk, dpv = (_alloc.empty(pk.shape, dtype=dt, device=dev) for _ in range(2))
        torch.sum(part[0], 0, keepdim=True, out=dpk)
        torch.sum(part[1], 0, keepdim=True, out=dpv)
    if fused is not None:
        return dq, dk, dv, dpk, dpv, dgate

    _launch(
        "dq",
        lambda meta: _grid(triton.cdiv(T, meta["BLOCK_M"]), B * H),
        _launch_candidates("dq", dev, dt, Dh),
        q, k, v, pk, pv, g, m, do, hi, lo, delta, dq,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(pk), *_strides3(pv), *ms,
        *_strides3(do), *_strides3(dq), *gs,
        H, group, T, S, P, scale * LOG2E, scale,
        **common, FAST=_fast_path, FP32=fp32, bucket=_length_bucket(T, S, P, B * H),
    )  # fmt: skip
    return dq, dk, dv, dpk, dpv, dgate


# ----------------------------------------------------------------------------------------------
# Registry: compile specs and launch cases


def _sig(names: str, types: dict[str, str]) -> dict[str, str]:
    out = {}
    for name in names.split():
        out[name] = types.get(name, "i32")
    return out


_FWD_ARGS = (
    "Q K V PK PV G MASK OUT LSE sqb sqh sqt skb skh sks svb svh svs spkb spkh spkp spvb spvh spvp "
    "smb smh smt sob soh sot sgb sgh H GROUP T S P qk_scale HEAD_DIM"
)
_PRE_ARGS = "OUT DO LSE MASK DELTA HI LO DGATE sob soh sot sdob sdoh sdot smb smh smt sgb sgh H T S HEAD_DIM"
_DKDV_ARGS = (
    "Q K V PK PV G MASK DO HI LO DELTA DK DV DPK DPV DGATE sqb sqh sqt skb skh sks svb svh svs "
    "spkb spkh spkp spvb spvh spvp smb smh smt sdob sdoh sdot sdkb sdkh sdks sdvb sdvh sdvs "
    "sdpkb sdpkh sdpkp sdpvb sdpvh sdpvp sgb sgh H GROUP T S P qk_scale sm_scale HEAD_DIM"
)
_DQ_ARGS = (
    "Q K V PK PV G MASK DO HI LO DELTA DQ sqb sqh sqt skb skh sks svb svh svs spkb spkh spkp spvb spvh spvp "
    "smb smh smt sdob sdoh sdot sdqb sdqh sdqt sgb sgh H GROUP T S P qk_scale sm_scale HEAD_DIM"
)

_FUSED_ARGS = (
    "Q K V PK PV G MASK DO OUT LSE DQ DK DV DPK DPV DGATE sqb sqh sqt skb skh sks svb svh svs "
    "spkb spkh spkp spvb spvh spvp smb smh smt sdob sdoh sdot sob soh sot sdqb sdqh sdqt "
    "sdkb sdkh sdks sdvb sdvh sdvs sdpkb sdpkh sdpkp sdpvb sdpvh sdpvp sgb sgh H GROUP T S P qk_scale sm_scale HEAD_DIM"
)


def dprompt_ty(dtype: torch.dtype, kind: int) -> dict[str, str]:
    """Pointer types of the dk/dv launch's prompt outputs in a spec: the input dtype (prompt batch =
    B), or float32 per-batch partials (a broadcast prompt) for the bool-mask variant, the one the
    launch cases launch that way."""
    ty = "fp32" if kind == MASK_BOOL else _TRITON_TYPE[dtype]
    return {"DPK": f"*{ty}", "DPV": f"*{ty}"}


# The mask kind and causality change no tile shape: the specs compile the heaviest variant (additive
# [B, H, T, S] mask tile loads + causal compare) of every candidate for every head size and dtype, plus
# the other variants of the fixed (first) candidates at head size 64.
VARIANTS_DH64 = ((MASK_ADDITIVE, True), (MASK_ADDITIVE, False), (MASK_BOOL, True), (MASK_NONE, False))


def _variants(head_dim: int, first: bool) -> tuple[tuple[int, bool], ...]:
    return VARIANTS_DH64 if head_dim == 64 and first else VARIANTS_DH64[:1]


def table_tiles(kernel: str, dtype: torch.dtype, head_dim: int) -> dict[TileConfig, tuple[int, ...] | None]:
    """Every tile ``kernel`` can launch on the checked architectures for a dtype and head size ->
    the architectures that launch it (None: all), in table order (the fixed tiles first)."""
    archs: dict[TileConfig, list[int]] = {}
    for arch in ARCHS:
        for c in candidates(kernel, arch, dtype, head_dim):
            archs.setdefault(c, []).append(arch)
    return {c: None if len(a) == len(ARCHS) else tuple(a) for c, a in archs.items()}


_SPEC_KERNELS = {
    "fwd": ("gpa_fwd", _FWD_ARGS, True),
    "dkdv": ("gpa_bwd_dkdv", _DKDV_ARGS, True),
    "pre": ("gpa_bwd_preprocess", _PRE_ARGS, False),
    "dq": ("gpa_bwd_dq", _DQ_ARGS, True),
    "fused": ("gpa_bwd_fused", _FUSED_ARGS, True),
    "rows": ("gpa_bwd_rows", _FUSED_ARGS, True),
}


def _spec(
    kernel: str, dtype: torch.dtype, hd: int, kind: int, causal: bool, tile: TileConfig, archs, extra: bool
) -> CompileSpec:
    """The spec of one tile (``extra``: not the fixed one; its name adds num_warps and num_stages)."""
    ty = _TRITON_TYPE[dtype]
    prefix, args, uses_dot = _SPEC_KERNELS[kernel]
    types = {n: f"*{ty}" for n in ("Q", "K", "V", "PK", "PV", "OUT", "DO", "DQ", "DK", "DV")}
    types |= {n: "*fp32" for n in ("G", "LSE", "HI", "LO", "DELTA", "DGATE")}
    types |= {"qk_scale": "fp32", "sm_scale": "fp32", "MASK": "*u8" if kind == MASK_BOOL else f"*{ty}"}
    if kernel in ("dkdv", "fused", "rows"):
        types |= dprompt_ty(dtype, kind)
    consts = dict(D_PAD=d_pad(hd), EVEN_D=even_d(hd), MASK_KIND=kind, IS_CAUSAL=causal)
    if kernel in ("fused", "rows"):
        consts |= dict(FP32=dtype == torch.float32)
    elif kernel != "pre":
        consts |= dict(FAST=True, FP32=dtype == torch.float32)
    consts |= tile.kwargs
    tag = f"{ty},Dh={hd},mask={('none', 'bool', 'add')[kind]},causal={int(causal)}"
    name = f"{prefix}[{tag},BM={tile.kwargs['BLOCK_M']},BN={tile.kwargs['BLOCK_N']}"
    if kernel in ("fused", "rows"):
        name += f",BNP={tile.kwargs['BLOCK_NP']}"
    name += f",w={tile.num_warps},s={tile.num_stages}]" if extra else "]"
    return CompileSpec(
        name=name,
        kernel=globals()[_ALL_KERNEL_NAMES[kernel]],
        signature=_sig(args, types) | {k: "constexpr" for k in consts},
        constexprs=consts,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        uses_dot=uses_dot,
        archs=archs,
    )


@register_compile_specs(OP)
def _compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in DTYPES:
        for hd in HEAD_DIMS:
            for kernel in ("fwd", "dkdv", "pre", "dq"):
                fixed = {candidates(kernel, arch, dtype, hd)[0] for arch in ARCHS}
                for tile, archs in table_tiles(kernel, dtype, hd).items():
                    for kind, causal in _variants(hd, tile in fixed):
                        specs.append(_spec(kernel, dtype, hd, kind, causal, tile, archs, tile not in fixed))
            # the fused backward: every (BLOCK_N, BLOCK_NP) its launcher can choose, heaviest variant;
            # the largest tile in every variant at head size 64
            fused: dict[TileConfig, list[int]] = {}
            for arch in ARCHS:
                for tile in fused_tiles(arch, dtype, hd):
                    fused.setdefault(tile, []).append(arch)
            for tile, archs in fused.items():
                largest = tile in {
                    fused_tiles(arch, dtype, hd)[0] for arch in ARCHS if fused_tiles(arch, dtype, hd)
                }
                for kind, causal in _variants(hd, largest):
                    specs.append(
                        _spec(
                            "fused",
                            dtype,
                            hd,
                            kind,
                            causal,
                            tile,
                            None if len(archs) == len(ARCHS) else tuple(archs),
                            False,
                        )
                    )
            # the rows backward: every BLOCK_M its launcher can choose, heaviest variant; the largest
            # tile in every variant at head size 64
            by_rows: dict[TileConfig, list[int]] = {}
            for arch in ARCHS:
                for tile in rows_tiles(arch, dtype, hd):
                    by_rows.setdefault(tile, []).append(arch)
            for tile, archs in by_rows.items():
                largest = tile in {
                    rows_tiles(arch, dtype, hd)[0] for arch in ARCHS if rows_tiles(arch, dtype, hd)
                }
                arch_sel = None if len(archs) == len(ARCHS) else tuple(archs)
                for kind, causal in _variants(hd, largest):
                    specs.append(_spec("rows", dtype, hd, kind, causal, tile, arch_sel, False))
    return specs


def _case_inputs(B, H, Hkv, T, S, P, Dh, dtype, Bp, mask_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    q, k, v = r(B, H, T, Dh), r(B, Hkv, S, Dh), r(B, Hkv, S, Dh)
    pk, pv = r(Bp, Hkv, P, Dh), r(Bp, Hkv, P, Dh)
    gate = torch.rand(H, generator=gen) * 0.8 + 0.1
    mask = None
    if mask_kind == MASK_BOOL:
        mask = torch.rand(B, S, generator=gen) > 0.2
    elif mask_kind == MASK_ADDITIVE:
        mask = r(B, 1, T, S)
    return q, k, v, pk, pv, gate, mask


def _torch_out_lse(q, k, v, pk, pv, gate, mask, is_causal, scale):
    """(out, lse) of the launch cases' inputs in plain PyTorch (float32; gates > 0, no saturated or
    fully masked row), for the backward's cases."""
    B, H, T, _ = q.shape
    S, P, rep = k.shape[2], pk.shape[2], H // k.shape[1]
    keys, values = (torch.cat([p.expand(B, -1, -1, -1), t], 2).float() for p, t in ((pk, k), (pv, v)))
    s = q.float() @ keys.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    s[..., :P] += gate.float().expand(B, H).log()[:, :, None, None]
    if mask is not None:
        if mask.is_floating_point():
            s[..., P:] += mask.to(q.dtype).float()
        else:
            s[..., P:] = s[..., P:].masked_fill(~mask[:, None, None], -math.inf)
    if is_causal:
        s[..., P:] = s[..., P:].masked_fill(
            torch.ones(T, S, dtype=torch.bool).tril(S - T).logical_not(), -math.inf
        )
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ values.repeat_interleave(rep, 1)
    return out.to(q.dtype), lse.contiguous()


@register_launch_cases(OP)
def _launch_cases() -> list[LaunchCase]:
    cases = []
    shapes = [
        # (B, H, Hkv, T, S, P, Dh, dtype, Bp, mask kind, causal)
        (2, 4, 2, 64, 64, 16, 64, torch.float16, 1, MASK_BOOL, False),
        (1, 2, 2, 48, 80, 8, 32, torch.float32, 1, MASK_NONE, True),
        (1, 2, 1, 32, 32, 5, 80, torch.float16, 1, MASK_ADDITIVE, False),
        # 128 keys: past the fused backward's one key block; the group's 128 query rows fit the rows
        # backward's block on sm_90, not on sm_80 (64 rows at Dh 64: the three launches)
        (2, 4, 2, 64, 128, 16, 64, torch.float16, 1, MASK_BOOL, False),
        # 192 query rows and 192 keys: the three launches on every architecture (also the fp16 launch
        # the compile check specialises their specs with)
        (1, 4, 2, 96, 192, 16, 64, torch.float16, 1, MASK_BOOL, False),
    ]
    for B, H, Hkv, T, S, P, Dh, dtype, Bp, kind, causal in shapes:
        ins = _case_inputs(B, H, Hkv, T, S, P, Dh, dtype, Bp, kind)
        scale = Dh**-0.5
        fl = floors.gated_prefix_attention_floors(
            B, H, Hkv, T, S, P, Dh, dtype=dtype, prompt_batch=Bp, gate_numel=H,
            mask=("none", "bool", "additive")[kind], mask_heads=1, is_causal=causal,
        )  # fmt: skip
        desc = (
            f"B={B} H={H} Hkv={Hkv} T={T} S={S} P={P} Dh={Dh} {_TRITON_TYPE[dtype]} "
            f"mask={('none', 'bool', 'additive')[kind]} causal={int(causal)}"
        )
        note = (
            "bytes: q,k,v,pk,pv,gate,mask read once, out (+ lse) written once; backward adds out, grad_out, "
            "lse read and dq,dk,dv,dpk,dpv,dgate written. flops: 4*B*H*Dh*(T*P + visible key pairs) forward "
            "(visible pairs T*S, or sum_t clamp(t+S-T+1, 0, S) causal), 2.5x that backward"
        )

        def fwd(ins=ins, scale=scale, causal=causal):
            return forward(*ins, causal, scale)

        def bwd(ins=ins, scale=scale, causal=causal):
            # out and lse from plain PyTorch (same lse convention), so only backward launches count.
            out, lse = _torch_out_lse(*ins, causal, scale)
            return backward(torch.ones_like(out), *ins, out, lse, causal, scale)

        cases.append(
            LaunchCase(
                f"{OP} fwd {desc}", OP, "forward", fwd, fl["forward"]["bytes"], fl["forward"]["flops"], note
            )
        )
        cases.append(
            LaunchCase(
                f"{OP} bwd {desc}",
                OP,
                "backward",
                bwd,
                fl["backward"]["bytes"],
                fl["backward"]["flops"],
                note,
            )
        )
        if _backward_path(90, dtype, Dh, H // Hkv, T, S, P) != _backward_path(
            DEFAULT_ARCH, dtype, Dh, H // Hkv, T, S, P
        ):

            def bwd90(bwd=bwd):
                with interpreter_arch(90):
                    return bwd()

            cases.append(
                LaunchCase(
                    f"{OP} bwd {desc} (sm_90 tiles: {_backward_path(90, dtype, Dh, H // Hkv, T, S, P)})",
                    OP,
                    "backward",
                    bwd90,
                    fl["backward"]["bytes"],
                    fl["backward"]["flops"],
                    note,
                )
            )
    return cases
