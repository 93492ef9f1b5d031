"""Triton kernels for gated prefix attention (FlashAttention-2 style, two key segments).

Shapes (strides are free except a unit stride on the last dimension, which the launchers enforce):

    q, out, grad_out:  [B, H, T, Dh]
    k, v:              [B, Hkv, S, Dh]           kv head of query head h: h // (H // Hkv)
    pk, pv:            [B or 1, Hkv, P, Dh]      batch 1 is read with batch stride 0
    gate:              [B, H] float32 (the launcher expands the caller's broadcast gate)
    mask:              none | uint8 [B, S] key padding | additive [B, 1 or H, T, S] (query dtype)
    lse:               [B, H, T] float32, natural log; +inf on rows with no weight (their output is 0)

Forward, one program per (BLOCK_M queries, b, h): the online softmax runs over the P prompt keys
(logit ``scale * q.pk + log(gate)``, skipped entirely when gate = 0), then over the S keys (masked,
causal bottom-right), in base 2. The running max is made safe for rows that have seen only -inf.

Backward (three launches plus a tiny preprocess):
  * ``delta = rowsum(grad_out * out)``;
  * dk, dv: one program per (BLOCK_N keys, b, kv head), looping over the query heads of the group
    and the query blocks that can see those keys; written directly (each key has one owner);
  * dprompt_key, dprompt_value, dgate: the same kernel over prompt key blocks, writing per-batch fp32
    partials [B, Hkv, P, Dh] (summed over the batch on the host when the prompt is broadcast) and
    dgate partials [B, H, P blocks] = sum exp(s_ungated - lse) * (dP - delta), finite at gate = 0;
  * dq: one program per (BLOCK_M queries, b, h) over both segments.
The T x (P + S) probability matrix never exists in global memory.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from prompt_kernels import _alloc
from prompt_kernels.kernels.registry import (
    CompileSpec,
    LaunchCase,
    register_compile_specs,
    register_launch_cases,
)

OP = "gated_prefix_attention"
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
LOG2E = 1.4426950408889634


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
    """Pointers [len(rows), D_PAD] to rows of a [..., Dh] tensor. The launcher guarantees 16-byte
    aligned rows (data pointer and every stride), so the hints let the loads vectorise."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, D_PAD])


@triton.jit
def _mask_keys(
    s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr
):
    """Apply key padding / additive mask / causal limit to base-2 logits s [BLOCK_M, BLOCK_N]."""
    if MASK_KIND == 1:
        keep = tl.load(MASK + mask_base + cols, mask=c_ok, other=0)
        s = tl.where(keep[None, :] != 0, s, float("-inf"))
    if MASK_KIND == 2:
        add = tl.load(
            MASK + mask_base + rows[:, None] * smt + cols[None, :],
            mask=r_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        add = add.to(tl.float32)
        # Base 2 for the mask too, except near float32's limit (Hugging Face pads with finfo.min),
        # where * log2(e) would overflow to -inf and turn "tiny but finite" into "masked".
        s = s + tl.where(add > -1.0e38, add * 1.4426950408889634, add)
    if IS_CAUSAL:
        s = tl.where(cols[None, :] <= rows[:, None] + (S - T), s, float("-inf"))
    return tl.where(c_ok[None, :], s, float("-inf"))


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


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _gpa_fwd_kernel(
    Q, K, V, PK, PV, G, MASK, OUT, LSE,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sob, soh, sot,
    H, GROUP, T, S, P, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    r_ok = rows < T

    q = tl.load(
        _rows(Q + b * sqb + h * sqh, rows, sqt, offs_d, D_PAD),
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Prompt segment: gate = 0 removes it exactly (and log2(0) never enters the arithmetic).
    g = tl.load(G + pid_bh)
    log2g = tl.log2(tl.where(g > 0, g, 1.0))  # used only when g > 0
    p_end = tl.where(g > 0, P, 0)
    pk_base = PK + b * spkb + hk * spkh
    pv_base = PV + b * spvb + hk * spvh
    for start in range(0, p_end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < P
        k = tl.load(_rows(pk_base, cols, spkp, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(_rows(pv_base, cols, spvp, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale + log2g
        s = tl.where(c_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, FP32)

    # Key segment.
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = b * smb + h * smh
    end = _causal_key_end(pid_m, S, T, BLOCK_M, IS_CAUSAL)
    for start in range(0, end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < S
        k = tl.load(_rows(k_base, cols, sks, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(_rows(v_base, cols, svs, offs_d, D_PAD), mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale
        s = _mask_keys(s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND, IS_CAUSAL)
        m_i, l_i, acc = _online_step(s, v, m_i, l_i, acc, FP32)

    # Rows with no weight at all (every key masked, no prompt): zeros, lse = +inf.
    dead = m_i == float("-inf")
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(
        _rows(OUT + b * sob + h * soh, rows, sot, offs_d, D_PAD),
        out.to(OUT.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * T + rows, lse, mask=r_ok)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _gpa_bwd_preprocess_kernel(
    OUT, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, H, T,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[b, h, t] = sum_d grad_out * out (float32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_rows(OUT + b * sob + h * soh, rows, sot, offs_d, D_PAD), mask=ok, other=0.0)
    do = tl.load(_rows(DO + b * sdob + h * sdoh, rows, sdot, offs_d, D_PAD), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _gpa_bwd_dkdv_kernel(
    Q, K, V, G, MASK, DO, LSE, DELTA, DK, DV, DGATE,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    smb, smh, smt, sdob, sdoh, sdot,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    H, GROUP, T, S, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    IS_PROMPT: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk, dv of N keys (the S keys, or with IS_PROMPT the P prompt keys, whose logits carry
    log(gate) and which also give the dgate partials). K, V are indexed with batch b (stride 0
    for a broadcast prompt); DK, DV with batch b too (per-batch partials for the prompt)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    Hkv = H // GROUP
    b = (pid_bk // Hkv).to(tl.int64)
    hk = pid_bk % Hkv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    c_ok = cols < N
    kv_ok = c_ok[:, None] & d_ok[None, :]
    k = tl.load(_rows(K + b * skb + hk * skh, cols, sks, offs_d, D_PAD), mask=kv_ok, other=0.0)
    v = tl.load(_rows(V + b * svb + hk * svh, cols, svs, offs_d, D_PAD), mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    lo = 0
    if IS_CAUSAL:
        # The first query that sees key pid_n * BLOCK_N is t = key - (S - T).
        lo = tl.maximum(pid_n * BLOCK_N - (S - T), 0) // BLOCK_M * BLOCK_M
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        bh = b * H + h
        if IS_PROMPT:
            g = tl.load(G + bh)
            # -inf at gate = 0: p = 0, while the ungated term below stays finite.
            log2g = tl.where(g > 0, tl.log2(tl.where(g > 0, g, 1.0)), float("-inf"))
            dg = tl.zeros([BLOCK_M], tl.float32)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = b * smb + h * smh
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + offs_m
            r_ok = rows < T
            qo_ok = r_ok[:, None] & d_ok[None, :]
            q = tl.load(_rows(q_base, rows, sqt, offs_d, D_PAD), mask=qo_ok, other=0.0)
            do = tl.load(_rows(do_base, rows, sdot, offs_d, D_PAD), mask=qo_ok, other=0.0)
            lse2 = tl.load(LSE + bh * T + rows, mask=r_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + bh * T + rows, mask=r_ok, other=0.0)
            s = _dot(q, tl.trans(k), FP32) * qk_scale
            if IS_PROMPT:
                s = tl.where(c_ok[None, :], s, float("-inf"))
                p = tl.exp2(s + log2g - lse2[:, None])
            else:
                s = _mask_keys(s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND, IS_CAUSAL)
                p = tl.exp2(s - lse2[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, FP32)
            dp_delta = _dot(do, tl.trans(v), FP32) - delta[:, None]
            ds = p * dp_delta
            if IS_PROMPT:
                # d out / d gate uses the ungated probability exp(s - lse): finite at gate = 0.
                dg += tl.sum(tl.exp2(s - lse2[:, None]) * dp_delta, 1)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32)
        if IS_PROMPT:
            tl.store(DGATE + bh * tl.num_programs(0) + pid_n, tl.sum(dg, 0))
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
def _gpa_bwd_dq_kernel(
    Q, K, V, PK, PV, G, MASK, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    spkb, spkh, spkp, spvb, spvh, spvp,
    smb, smh, smt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
    H, GROUP, T, S, P, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    r_ok = rows < T
    qo_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q + b * sqb + h * sqh, rows, sqt, offs_d, D_PAD), mask=qo_ok, other=0.0)
    do = tl.load(_rows(DO + b * sdob + h * sdoh, rows, sdot, offs_d, D_PAD), mask=qo_ok, other=0.0)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=r_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    g = tl.load(G + pid_bh)
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
        p = tl.exp2(s - lse2[:, None])
        ds = p * (_dot(do, tl.trans(v), FP32) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32)

    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = b * smb + h * smh
    end = _causal_key_end(pid_m, S, T, BLOCK_M, IS_CAUSAL)
    for start in range(0, end, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < S
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(_rows(k_base, cols, sks, offs_d, D_PAD), mask=kv_ok, other=0.0)
        v = tl.load(_rows(v_base, cols, svs, offs_d, D_PAD), mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), FP32) * qk_scale
        s = _mask_keys(s, MASK, mask_base, rows, cols, r_ok, c_ok, smt, S, T, MASK_KIND, IS_CAUSAL)
        p = tl.exp2(s - lse2[:, None])
        ds = p * (_dot(do, tl.trans(v), FP32) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32)

    dq = dq * sm_scale
    tl.store(
        _rows(DQ + b * sdqb + h * sdqh, rows, sdqt, offs_d, D_PAD),
        dq.to(DQ.dtype.element_ty),
        mask=qo_ok,
    )


# ----------------------------------------------------------------------------------------------
# Configurations (the launchers choose exactly these; the compile specs register exactly these)

_override_blocks: tuple[int, int] | None = None


@contextlib.contextmanager
def force_blocks(block_m: int, block_n: int):
    """Tests only: run every kernel with these block sizes (small blocks exercise the multi-block
    loops at interpreter-friendly sizes). Block sizes below 16 are valid only under the interpreter."""
    global _override_blocks
    old, _override_blocks = _override_blocks, (block_m, block_n)
    try:
        yield
    finally:
        _override_blocks = old


def d_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, dtype class and padded head size. Chosen
# with ptxas -v on sm_80 and sm_90 for the heaviest variant (additive [B, H, T, S] mask + causal):
# none spills. fp32 dots run in IEEE precision on the FMA units with their operands in registers,
# hence the small tiles; 128-row fp16 tiles need 8 warps.
_CONFIGS = {
    "lowp": {
        32: {
            "fwd": (128, 32, 8, 3),
            "dkdv": (32, 64, 8, 2),
            "dkdv_prompt": (32, 64, 8, 2),
            "dq": (128, 32, 8, 2),
        },
        64: {
            "fwd": (128, 64, 8, 3),
            "dkdv": (16, 32, 4, 2),
            "dkdv_prompt": (32, 64, 8, 2),
            "dq": (128, 32, 8, 2),
        },
        128: {
            "fwd": (64, 32, 4, 3),
            "dkdv": (32, 64, 8, 2),
            "dkdv_prompt": (32, 64, 8, 2),
            "dq": (64, 32, 8, 2),
        },
    },
    "fp32": {
        32: {
            "fwd": (64, 32, 4, 2),
            "dkdv": (16, 32, 4, 1),
            "dkdv_prompt": (32, 32, 8, 1),
            "dq": (32, 32, 8, 1),
        },
        64: {
            "fwd": (32, 32, 8, 1),
            "dkdv": (32, 32, 8, 1),
            "dkdv_prompt": (32, 32, 8, 1),
            "dq": (32, 32, 8, 1),
        },
        128: {
            "fwd": (16, 16, 4, 1),
            "dkdv": (32, 32, 8, 1),
            "dkdv_prompt": (32, 16, 8, 1),
            "dq": (16, 32, 8, 1),
        },
    },
}
_PRE_CONFIG = (64, 0, 4, 1)


def configs(dtype: torch.dtype, head_dim: int) -> dict[str, tuple[int, int, int, int]]:
    """``kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages)`` for a dtype and head size (80 and 96
    use the padded 128 configuration); ``dkdv_prompt`` is the dk/dv kernel on the prompt segment."""
    cls = "fp32" if dtype == torch.float32 else "lowp"
    return {**_CONFIGS[cls][max(32, d_pad(head_dim))], "pre": _PRE_CONFIG}


def _blocks(cfg: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if _override_blocks is None:
        return cfg
    return (_override_blocks[0], _override_blocks[1] or cfg[1], cfg[2], cfg[3])


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


def _gate_bh(gate: torch.Tensor, B: int, H: int) -> torch.Tensor:
    return gate.detach().to(torch.float32).expand(B, H).contiguous()


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
    g = _gate_bh(gate, B, H)
    BM, BN, warps, stages = _blocks(configs(q.dtype, Dh)["fwd"])
    grid = (triton.cdiv(T, BM), B * H)
    _gpa_fwd_kernel[grid](
        q, k, v, pk, pv, g, m, out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(pk), *_strides3(pv),
        *ms, *_strides3(out),
        H, H // Hkv, T, S, P, scale * LOG2E,
        HEAD_DIM=Dh, D_PAD=d_pad(Dh), MASK_KIND=kind, IS_CAUSAL=bool(is_causal),
        FP32=q.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def backward(
    grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    """-> (dq, dk, dv, dprompt_key, dprompt_value, dgate [B, H] float32).

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
    dgate = _alloc.empty((B, H), dtype=torch.float32, device=dev)
    if B * H * T == 0 or Dh == 0:
        for t in (dq, dk, dv, dgate):
            t.zero_()
        zp = torch.zeros(pk.shape, dtype=dt, device=dev)
        return dq, dk, dv, zp, zp.clone(), dgate
    kind, m, ms = _prepare_mask(attention_mask, q, H)
    g = _gate_bh(gate, B, H)
    cfg = configs(dt, Dh)
    dp_, fp32 = d_pad(Dh), dt == torch.float32
    group = H // Hkv

    delta = _alloc.empty((B, H, T), dtype=torch.float32, device=dev)
    BM, _, warps, stages = _blocks(cfg["pre"])
    _gpa_bwd_preprocess_kernel[(triton.cdiv(T, BM), B * H)](
        o, do, delta, *_strides3(o), *_strides3(do), H, T,
        HEAD_DIM=Dh, D_PAD=dp_, BLOCK_M=BM, num_warps=warps, num_stages=stages,
    )  # fmt: skip

    BM, BN, warps, stages = _blocks(cfg["dkdv"])
    common = dict(
        HEAD_DIM=Dh, D_PAD=dp_, FP32=fp32, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages
    )
    if S > 0:
        _gpa_bwd_dkdv_kernel[(triton.cdiv(S, BN), B * Hkv)](
            q, k, v, g, m, do, lse, delta, dk, dv, dgate,
            *_strides3(q), *_strides3(k), *_strides3(v), *ms, *_strides3(do), *_strides3(dk), *_strides3(dv),
            H, group, T, S, S, scale * LOG2E, scale,
            MASK_KIND=kind, IS_CAUSAL=bool(is_causal), IS_PROMPT=False, **common,
        )  # fmt: skip
    if P > 0:
        BM, BN, warps, stages = _blocks(cfg["dkdv_prompt"])
        common = dict(
            HEAD_DIM=Dh, D_PAD=dp_, FP32=fp32, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages
        )
        n_pblocks = triton.cdiv(P, BN)
        dpk_part = _alloc.empty((B, Hkv, P, Dh), dtype=torch.float32, device=dev)
        dpv_part = _alloc.empty((B, Hkv, P, Dh), dtype=torch.float32, device=dev)
        dgate_part = _alloc.empty((B, H, n_pblocks), dtype=torch.float32, device=dev)
        _gpa_bwd_dkdv_kernel[(n_pblocks, B * Hkv)](
            q, pk, pv, g, q, do, lse, delta, dpk_part, dpv_part, dgate_part,  # no mask on the prompt
            *_strides3(q), *_strides3(pk), *_strides3(pv), 0, 0, 0, *_strides3(do),
            *_strides3(dpk_part), *_strides3(dpv_part),
            H, group, T, S, P, scale * LOG2E, scale,
            MASK_KIND=MASK_NONE, IS_CAUSAL=False, IS_PROMPT=True, **common,
        )  # fmt: skip
        if Bp == 1 and B > 1:
            dpk_part, dpv_part = dpk_part.sum(0, keepdim=True), dpv_part.sum(0, keepdim=True)
        dpk, dpv = dpk_part.to(dt), dpv_part.to(dt)
        torch.sum(dgate_part, dim=2, out=dgate)
    else:
        dpk = torch.zeros(pk.shape, dtype=dt, device=dev)
        dpv = torch.zeros(pv.shape, dtype=dt, device=dev)
        dgate.zero_()
    if S == 0:
        dk.zero_()
        dv.zero_()

    BM, BN, warps, stages = _blocks(cfg["dq"])
    _gpa_bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](
        q, k, v, pk, pv, g, m, do, lse, delta, dq,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(pk), *_strides3(pv), *ms,
        *_strides3(do), *_strides3(dq),
        H, group, T, S, P, scale * LOG2E, scale,
        HEAD_DIM=Dh, D_PAD=dp_, MASK_KIND=kind, IS_CAUSAL=bool(is_causal), FP32=fp32,
        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
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
    "smb smh smt sob soh sot H GROUP T S P qk_scale"
)
_PRE_ARGS = "OUT DO DELTA sob soh sot sdob sdoh sdot H T"
_DKDV_ARGS = (
    "Q K V G MASK DO LSE DELTA DK DV DGATE sqb sqh sqt skb skh sks svb svh svs smb smh smt "
    "sdob sdoh sdot sdkb sdkh sdks sdvb sdvh sdvs H GROUP T S N qk_scale sm_scale"
)
_DQ_ARGS = (
    "Q K V PK PV G MASK DO LSE DELTA DQ sqb sqh sqt skb skh sks svb svh svs spkb spkh spkp spvb spvh spvp "
    "smb smh smt sdob sdoh sdot sdqb sdqh sdqt H GROUP T S P qk_scale sm_scale"
)


# The mask kind and causality change no tile shape: the specs compile the heaviest variant (additive
# [B, H, T, S] mask tile loads + causal compare) for every head size and dtype, plus the other
# variants at head size 64.
def _variants(head_dim: int) -> list[tuple[int, bool]]:
    if head_dim == 64:
        return [(MASK_ADDITIVE, True), (MASK_ADDITIVE, False), (MASK_BOOL, True), (MASK_NONE, False)]
    return [(MASK_ADDITIVE, True)]


@register_compile_specs(OP)
def _compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in DTYPES:
        ty = _TRITON_TYPE[dtype]
        for hd in HEAD_DIMS:
            cfg = configs(dtype, hd)
            base = dict(HEAD_DIM=hd, D_PAD=d_pad(hd))
            ptr = {n: f"*{ty}" for n in ("Q", "K", "V", "PK", "PV", "OUT", "DO", "DQ")}
            f32 = {n: "*fp32" for n in ("G", "LSE", "DELTA", "DGATE")} | {
                "qk_scale": "fp32",
                "sm_scale": "fp32",
            }
            for kind, causal in _variants(hd):
                mask_ty = {"MASK": "*u8" if kind == MASK_BOOL else f"*{ty}"}
                tag = f"{ty},Dh={hd},mask={('none', 'bool', 'add')[kind]},causal={int(causal)}"
                var = dict(MASK_KIND=kind, IS_CAUSAL=causal, FP32=dtype == torch.float32)
                BM, BN, w, st = cfg["fwd"]
                specs.append(
                    CompileSpec(
                        name=f"gpa_fwd[{tag},BM={BM},BN={BN}]",
                        kernel=_gpa_fwd_kernel,
                        signature=_sig(_FWD_ARGS, ptr | f32 | mask_ty)
                        | {k: "constexpr" for k in (*base, *var, "BLOCK_M", "BLOCK_N")},
                        constexprs=base | var | {"BLOCK_M": BM, "BLOCK_N": BN},
                        num_warps=w,
                        num_stages=st,
                        uses_dot=True,
                    )
                )
                BM, BN, w, st = cfg["dkdv"]
                specs.append(
                    CompileSpec(
                        name=f"gpa_bwd_dkdv[{tag},BM={BM},BN={BN}]",
                        kernel=_gpa_bwd_dkdv_kernel,
                        signature=_sig(_DKDV_ARGS, ptr | f32 | mask_ty | {"DK": f"*{ty}", "DV": f"*{ty}"})
                        | {k: "constexpr" for k in (*base, *var, "IS_PROMPT", "BLOCK_M", "BLOCK_N")},
                        constexprs=base | var | {"IS_PROMPT": False, "BLOCK_M": BM, "BLOCK_N": BN},
                        num_warps=w,
                        num_stages=st,
                        uses_dot=True,
                    )
                )
                BM, BN, w, st = cfg["dq"]
                specs.append(
                    CompileSpec(
                        name=f"gpa_bwd_dq[{tag},BM={BM},BN={BN}]",
                        kernel=_gpa_bwd_dq_kernel,
                        signature=_sig(_DQ_ARGS, ptr | f32 | mask_ty)
                        | {k: "constexpr" for k in (*base, *var, "BLOCK_M", "BLOCK_N")},
                        constexprs=base | var | {"BLOCK_M": BM, "BLOCK_N": BN},
                        num_warps=w,
                        num_stages=st,
                        uses_dot=True,
                    )
                )
            # The prompt segment of the dk/dv kernel (no mask, not causal, fp32 partial outputs).
            BM, BN, w, st = cfg["dkdv_prompt"]
            var = dict(MASK_KIND=MASK_NONE, IS_CAUSAL=False, IS_PROMPT=True, FP32=dtype == torch.float32)
            specs.append(
                CompileSpec(
                    name=f"gpa_bwd_dkdv_prompt[{ty},Dh={hd},BM={BM},BN={BN}]",
                    kernel=_gpa_bwd_dkdv_kernel,
                    signature=_sig(_DKDV_ARGS, ptr | f32 | {"MASK": f"*{ty}", "DK": "*fp32", "DV": "*fp32"})
                    | {k: "constexpr" for k in (*base, *var, "BLOCK_M", "BLOCK_N")},
                    constexprs=base | var | {"BLOCK_M": BM, "BLOCK_N": BN},
                    num_warps=w,
                    num_stages=st,
                    uses_dot=True,
                )
            )
            BM, _, w, st = cfg["pre"]
            specs.append(
                CompileSpec(
                    name=f"gpa_bwd_preprocess[{ty},Dh={hd},BM={BM}]",
                    kernel=_gpa_bwd_preprocess_kernel,
                    signature=_sig(_PRE_ARGS, {"OUT": f"*{ty}", "DO": f"*{ty}", "DELTA": "*fp32"})
                    | {k: "constexpr" for k in (*base, "BLOCK_M")},
                    constexprs=base | {"BLOCK_M": BM},
                    num_warps=w,
                    num_stages=st,
                )
            )
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


@register_launch_cases(OP)
def _launch_cases() -> list[LaunchCase]:
    from prompt_kernels.ops.gated_prefix_attention import cpu_forward, gated_prefix_attention_floors

    cases = []
    shapes = [
        # (B, H, Hkv, T, S, P, Dh, dtype, Bp, mask kind, causal)
        (2, 4, 2, 64, 64, 16, 64, torch.float16, 1, MASK_BOOL, False),
        (1, 2, 2, 48, 80, 8, 32, torch.float32, 1, MASK_NONE, True),
        (1, 2, 1, 32, 32, 5, 80, torch.float16, 1, MASK_ADDITIVE, False),
    ]
    for B, H, Hkv, T, S, P, Dh, dtype, Bp, kind, causal in shapes:
        ins = _case_inputs(B, H, Hkv, T, S, P, Dh, dtype, Bp, kind)
        scale = Dh**-0.5
        fl = gated_prefix_attention_floors(
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
            # out and lse come from the CPU path (same lse convention), so only backward launches count.
            out, lse, *_ = cpu_forward(*ins, causal, scale)
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
    return cases
