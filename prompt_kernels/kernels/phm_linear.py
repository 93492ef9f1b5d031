"""Triton kernels of ``phm_linear``: ``y = x @ H + bias``, ``H = sum_i kron(rules[i], weights[i])``.

    x: [N, n*I] (any strides)   rules: [n, n, n]   weights: [n, I, O]   bias: [n*O]   y: [N, n*O]

``H[a*I + p, b*O + q] = sum_i rules[i, a, b] * weights[i, p, q]`` is never stored: each program
builds the small ``H`` tile it needs in registers (fp32, ``n`` scalar-times-tile multiply-adds from
``rules`` scalars and ``weights`` tiles, then rounded to the input dtype as a materialised ``H``
would be) right before the ``tl.dot`` that consumes it. ``x`` is read in place through its strides.

* ``_forward_kernel`` (grid ``(cdiv(N, BLOCK_M), n * cdiv(O, BLOCK_N))``): the output tile lies in
  block column ``b``; loop over ``a`` and chunks of ``BLOCK_K`` of ``p``:
  ``acc += x[rows, a*I + p] @ H_tile(a, b)[p, q]``; add the bias, store once.
* ``_grad_x_kernel`` (grid ``(cdiv(N, BLOCK_M), n * cdiv(I, BLOCK_N))``): ``dx = dy @ H^T`` the same
  way, with the ``H^T`` tile ``[q, p]`` built from transposed ``weights`` tiles.
* ``_grad_params_kernel`` (grid ``(cdiv(I, BLOCK_P) * cdiv(O, BLOCK_Q), n*n, splits)``): program
  ``(tile, (a, b), split)`` computes ``G = x_a^T dy_b`` on its ``[BLOCK_P, BLOCK_Q]`` tile over its
  range of rows (split-K over N, so that small weight gradients still fill the GPU), once, and
  reduces it twice: ``dweights[i, tile] += rules[i, a, b] * G`` and
  ``drules[i, a, b] += sum(weights[i, tile] * G)`` for every ``i``, and (first p-tile, ``a == 0``)
  ``dbias[b*O + q] += sum_rows dy``. The sums over tiles, ``(a, b)`` pairs and splits are fp32
  atomics into one zeroed scratch buffer, rounded to the output dtype at the end (not bit-for-bit
  deterministic across runs).

The loops over ``i`` are unrolled (``tl.static_range`` over a constexpr): in the weight-gradient
kernel always (``n`` constexpr), in the fp16/bf16 forward and grad_x kernels through ``N_UNROLL = n``,
which leaves their reduction loops without an inner loop so that Triton pipelines the loads
(cp.async, ``num_stages = 2``). fp32 forward/grad_x keep the loop over a runtime ``n``
(``N_UNROLL = 0``): unrolled, their fp32 tiles spill (see ``mm_unroll``).

All accumulation is fp32; fp32 dots use ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

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

OP = "phm_linear"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

BLOCK_M = 64  # rows per program (forward, grad_x)
# (BLOCK_N, BLOCK_K) of the forward and grad_x kernels: output columns per program (q for forward,
# p for grad_x) and reduction chunk (p for forward, q for grad_x). (64, 32) is left out: it spills on sm_80.
MM_CONFIGS = ((16, 16), (16, 32), (32, 16), (32, 32), (64, 16))
BLOCK_PQ_CHOICES = (16, 32)  # weight-gradient tile sides (64 x 64 needs ~250 registers)
BLOCK_R = 32  # rows per step of the weight-gradient reduction
NUM_WARPS = 4
NUM_STAGES = 2


def mm_unroll(dtype: torch.dtype, n: int) -> int:
    """``N_UNROLL`` of the forward and grad_x kernels: ``n`` for fp16/bf16 (the loop over ``i`` unrolled
    with ``tl.static_range``, so that the reduction loop is innermost and pipelined: cp.async), 0 for
    fp32 (IEEE dots on the FMA units; the loop over a runtime ``n`` kept). Unrolled, the fp32 tiles need
    up to 255 registers and spill 4-736 B on sm_80 and sm_90 with 2 stages (a few bytes with 1 stage,
    or with ``n`` a constexpr and the loop kept)."""
    return 0 if dtype == torch.float32 else int(n)


DOT_PRECISION = "ieee"  # only affects fp32 dots: exact fp32 products, no TF32
# ``n`` values compiled by the compile check: the launch cases' n = 4 (also PromptGenerator's default)
# and n = 2. ``n`` is a constexpr of the weight-gradient kernel, and ``N_UNROLL`` (= n) of the fp16/bf16
# forward and grad_x kernels, so the JIT compiles one specialisation per n launched; other n (1, 3, ...)
# are compiled by the JIT on first use on a GPU, not by the compile check.
COMPILE_N = (4, 2)


@triton.jit
def _h_term(r_ptr, w_ptr, i, a, b, n, I, O, p, q, mask, TRANSPOSED: tl.constexpr):
    """``rules[i, a, b] * weights[i, p, q]`` in fp32, as a ``[p, q]`` tile (``[q, p]`` if ``TRANSPOSED``)."""
    coef = tl.load(r_ptr + (i * n + a) * n + b).to(tl.float32)
    if TRANSPOSED:
        wt = tl.load(w_ptr + (i * I + p)[None, :] * O + q[:, None], mask=mask, other=0.0)
    else:
        wt = tl.load(w_ptr + (i * I + p)[:, None] * O + q[None, :], mask=mask, other=0.0)
    return coef * wt.to(tl.float32)


@triton.jit
def _h_tile(
    r_ptr, w_ptr, a, b, n, I, O, p, q, mask, R: tl.constexpr, C: tl.constexpr,
    TRANSPOSED: tl.constexpr, N_UNROLL: tl.constexpr,
):  # fmt: skip
    """The fp32 ``[R, C]`` tile of ``H`` of block ``(a, b)`` at rows ``p``, columns ``q``:
    ``sum_i rules[i, a, b] * weights[i, p, q]`` (of ``H^T``, at ``[q, p]``, if ``TRANSPOSED``).

    ``N_UNROLL > 0`` (``== n``): the loop over ``i`` unrolled (``tl.static_range``), so that the
    enclosing reduction loop is innermost and Triton pipelines its loads; 0: a loop over the runtime ``n``."""
    h = tl.zeros((R, C), dtype=tl.float32)
    if N_UNROLL > 0:
        for i in tl.static_range(N_UNROLL):
            h += _h_term(r_ptr, w_ptr, i, a, b, N_UNROLL, I, O, p, q, mask, TRANSPOSED)
    else:
        for i in range(0, n):
            h += _h_term(r_ptr, w_ptr, i, a, b, n, I, O, p, q, mask, TRANSPOSED)
    return h


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
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_o = tl.cdiv(O, BLOCK_N)
    b = pid_n // tiles_o
    q = (pid_n % tiles_o) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ok = q < O
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past N are clamped (read, never stored): the x loads need no row mask.
    x_rows = x_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_xm
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for a in range(0, n):
        for p0 in range(0, I, BLOCK_K):
            p = p0 + k
            p_ok = p < I
            xt = tl.load(x_rows + ((a * I + p) * stride_xk)[None, :], mask=p_ok[None, :], other=0.0)
            # H tile [p, q] of block (a, b), built in registers: sum_i rules[i, a, b] * weights[i, p, q]
            h = _h_tile(r_ptr, w_ptr, a, b, n, I, O, p, q, p_ok[:, None] & q_ok[None, :], BLOCK_K, BLOCK_N,
                        False, N_UNROLL)  # fmt: skip
            acc = tl.dot(xt, h.to(xt.dtype), acc, input_precision=DOT_PRECISION)
    if has_bias != 0:
        acc += tl.load(b_ptr + b * O + q, mask=q_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + (b * O + q)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows < N)[:, None] & q_ok[None, :])


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
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_i = tl.cdiv(I, BLOCK_N)
    a = pid_n // tiles_i
    p = (pid_n % tiles_i) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = p < I
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dy_rows = dy_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_dym
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, n):
        for q0 in range(0, O, BLOCK_K):
            q = q0 + k
            q_ok = q < O
            dyt = tl.load(dy_rows + ((b * O + q) * stride_dyk)[None, :], mask=q_ok[None, :], other=0.0)
            # H^T tile [q, p] of block (a, b): sum_i rules[i, a, b] * weights[i, p, q]
            ht = _h_tile(r_ptr, w_ptr, a, b, n, I, O, p, q, q_ok[:, None] & p_ok[None, :], BLOCK_K, BLOCK_N,
                         True, N_UNROLL)  # fmt: skip
            acc = tl.dot(dyt, ht.to(dyt.dtype), acc, input_precision=DOT_PRECISION)
    dx = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + (a * I + p)[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(rows < N)[:, None] & p_ok[None, :])


@triton.jit
def _grad_params_kernel(
    x_ptr,
    dy_ptr,
    r_ptr,
    w_ptr,
    dr_ptr,
    dw_ptr,
    db_ptr,
    N,
    n: tl.constexpr,
    I,
    O,
    rows_per_split,
    want_params,
    want_bias,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyk,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    ab = tl.program_id(1)
    split = tl.program_id(2)
    tiles_q = tl.cdiv(O, BLOCK_Q)
    p_tile = pid_t // tiles_q
    a = ab // n
    b = ab % n
    p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    q = (pid_t % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = p < I
    q_ok = q < O
    x_cols = x_ptr + (a * I + p).to(tl.int64)[:, None] * stride_xk
    dy_cols = dy_ptr + (b * O + q).to(tl.int64)[None, :] * stride_dyk
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, N)
    g = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_end
        xt = tl.load(
            x_cols + r.to(tl.int64)[None, :] * stride_xm, mask=p_ok[:, None] & r_ok[None, :], other=0.0
        )
        dyt = tl.load(
            dy_cols + r.to(tl.int64)[:, None] * stride_dym, mask=r_ok[:, None] & q_ok[None, :], other=0.0
        )
        g = tl.dot(xt, dyt, g, input_precision=DOT_PRECISION)
        dbias += tl.sum(dyt.to(tl.float32), axis=0)
    if want_params != 0:
        pq_mask = p_ok[:, None] & q_ok[None, :]
        w_offs = p[:, None] * O + q[None, :]
        for i in tl.static_range(n):
            r_off = (i * n + a) * n + b
            coef = tl.load(r_ptr + r_off).to(tl.float32)
            tl.atomic_add(dw_ptr + i * I * O + w_offs, coef * g, mask=pq_mask)
            wt = tl.load(w_ptr + i * I * O + w_offs, mask=pq_mask, other=0.0).to(tl.float32)
            tl.atomic_add(dr_ptr + r_off, tl.sum(tl.sum(wt * g, axis=1), axis=0))
    if (want_bias != 0) & (a == 0) & (p_tile == 0):
        tl.atomic_add(db_ptr + b * O + q, dbias, mask=q_ok)


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"phm_linear (triton): dtype must be one of {DTYPES}, got {t.dtype}")


def _mm_config(cols: int, reduce: int) -> dict:
    block_n = _pow2_clamp(cols, 16, 64)
    block_k = 32 if reduce > 16 and block_n <= 32 else 16
    assert (block_n, block_k) in MM_CONFIGS
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": block_k}


def forward_config(I: int, O: int) -> dict:
    return _mm_config(O, I)


def grad_x_config(I: int, O: int) -> dict:
    return _mm_config(I, O)


def grad_params_config(I: int, O: int) -> dict:
    return {
        "BLOCK_P": _pow2_clamp(I, 16, max(BLOCK_PQ_CHOICES)),
        "BLOCK_Q": _pow2_clamp(O, 16, max(BLOCK_PQ_CHOICES)),
        "BLOCK_R": BLOCK_R,
    }


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: enough splits that the tests cover several


def _split_rows(N: int, base_programs: int, device: torch.device) -> tuple[int, int]:
    """``(splits, rows_per_split)`` for the weight-gradient reduction over N rows."""
    want = max(1, -(-_target_programs(device) // max(base_programs, 1)))
    splits = max(1, min(want, triton.cdiv(N, BLOCK_R)))
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
    cfg = forward_config(I, O)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), n * triton.cdiv(O, cfg["BLOCK_N"]))
    _forward_kernel[grid](
        x2, rules, weights, bias.contiguous() if bias is not None else out, out,
        N, n, I, O, int(bias is not None),
        x2.stride(0), x2.stride(1), out.stride(0),
        DOT_PRECISION=DOT_PRECISION, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        N_UNROLL=mm_unroll(x2.dtype, n), **cfg,
    )  # fmt: skip
    return out


def phm_linear_backward(dy2, x2, rules, weights, grad_x, grad_rules, grad_weights, grad_bias) -> None:
    """Fill the gradients that are not None: ``grad_x [N, n*I]``, ``grad_rules [n, n, n]``,
    ``grad_weights [n, I, O]``, ``grad_bias [n*O]``."""
    _check_dtype(x2)
    rules = rules.contiguous()
    weights = weights.contiguous()
    n, I, O = weights.shape
    N = x2.shape[0]
    if grad_x is not None:
        assert grad_x.shape == (N, n * I) and grad_x.stride(1) == 1
        cfg = grad_x_config(I, O)
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), n * triton.cdiv(I, cfg["BLOCK_N"]))
        _grad_x_kernel[grid](
            dy2, rules, weights, grad_x, N, n, I, O,
            dy2.stride(0), dy2.stride(1), grad_x.stride(0),
            DOT_PRECISION=DOT_PRECISION, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            N_UNROLL=mm_unroll(dy2.dtype, n), **cfg,
        )  # fmt: skip
    want_params = grad_rules is not None or grad_weights is not None
    want_bias = grad_bias is not None
    if not (want_params or want_bias):
        return
    # fp32 scratch for the atomics: [dweights (n*I*O) | drules (n^3) | dbias (n*O)]
    scratch = torch.zeros(n * I * O + n**3 + n * O, dtype=torch.float32, device=x2.device)
    dw32 = scratch[: n * I * O]
    dr32 = scratch[n * I * O : n * I * O + n**3]
    db32 = scratch[n * I * O + n**3 :]
    cfg = grad_params_config(I, O)
    tiles = triton.cdiv(I, cfg["BLOCK_P"]) * triton.cdiv(O, cfg["BLOCK_Q"])
    if not want_params:
        tiles_ab = (triton.cdiv(O, cfg["BLOCK_Q"]), n)  # bias only: first p-tile, a == 0 programs
    else:
        tiles_ab = (tiles, n * n)
    splits, rows_per_split = _split_rows(N, tiles_ab[0] * tiles_ab[1], x2.device)
    _grad_params_kernel[(tiles_ab[0], tiles_ab[1], splits)](
        x2, dy2, rules, weights, dr32, dw32, db32,
        N, n, I, O, rows_per_split, int(want_params), int(want_bias),
        x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
        DOT_PRECISION=DOT_PRECISION, num_warps=NUM_WARPS, num_stages=NUM_STAGES, **cfg,
    )  # fmt: skip
    if grad_weights is not None:
        grad_weights.copy_(dw32.view(n, I, O))
    if grad_rules is not None:
        grad_rules.copy_(dr32.view(n, n, n))
    if grad_bias is not None:
        grad_bias.copy_(db32)


# ---------------------------------------------------------------------------------------------
# Registry: every configuration the launchers can choose, and small launches with their floors.


def _mm_signature(names_ptr: list[str], t: str, ints: list[str], constexprs: list[str]) -> dict[str, str]:
    sig = {name: f"*{t}" for name in names_ptr}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


@register_compile_specs(OP)
def _compile_specs() -> list[CompileSpec]:
    specs = []
    mm_consts = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_PRECISION", "N_UNROLL"]
    for dt in DTYPES:
        t = _TL[dt]
        for nu in sorted({mm_unroll(dt, n) for n in COMPILE_N}, reverse=True):
            for bn, bk in MM_CONFIGS:
                consts = {"BLOCK_M": BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_PRECISION": DOT_PRECISION}
                consts["N_UNROLL"] = nu
                sig = _mm_signature(
                    ["x_ptr", "r_ptr", "w_ptr", "b_ptr", "y_ptr"],
                    t,
                    ["N", "n", "I", "O", "has_bias", "stride_xm", "stride_xk", "stride_ym"],
                    mm_consts,
                )
                specs.append(
                    CompileSpec(
                        name=f"phm_linear_fwd[{t},N_UNROLL={nu},BM={BLOCK_M},BN={bn},BK={bk}]",
                        kernel=_forward_kernel,
                        signature=sig,
                        constexprs=consts,
                        num_warps=NUM_WARPS,
                        num_stages=NUM_STAGES,
                        uses_dot=True,
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
                        name=f"phm_linear_grad_x[{t},N_UNROLL={nu},BM={BLOCK_M},BN={bn},BK={bk}]",
                        kernel=_grad_x_kernel,
                        signature=sig,
                        constexprs=consts,
                        num_warps=NUM_WARPS,
                        num_stages=NUM_STAGES,
                        uses_dot=True,
                    )
                )
        for n in COMPILE_N:
            for bp in BLOCK_PQ_CHOICES:
                for bq in BLOCK_PQ_CHOICES:
                    sig = _mm_signature(["x_ptr", "dy_ptr", "r_ptr", "w_ptr"], t, [], [])
                    sig.update({"dr_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32"})
                    ints = ["N", "I", "O", "rows_per_split", "want_params", "want_bias"]
                    ints += ["stride_xm", "stride_xk", "stride_dym", "stride_dyk"]
                    sig.update({name: "i32" for name in ints})
                    sig.update(
                        {
                            name: "constexpr"
                            for name in ("n", "BLOCK_P", "BLOCK_Q", "BLOCK_R", "DOT_PRECISION")
                        }
                    )
                    specs.append(
                        CompileSpec(
                            name=f"phm_linear_grad_params[{t},n={n},BP={bp},BQ={bq},BR={BLOCK_R}]",
                            kernel=_grad_params_kernel,
                            signature=sig,
                            constexprs={
                                "n": n,
                                "BLOCK_P": bp,
                                "BLOCK_Q": bq,
                                "BLOCK_R": BLOCK_R,
                                "DOT_PRECISION": DOT_PRECISION,
                            },
                            num_warps=NUM_WARPS,
                            num_stages=NUM_STAGES,
                            uses_dot=True,
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
