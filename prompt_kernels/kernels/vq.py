"""Triton kernels of the vector quantiser: nearest code and Gumbel-max sampling, fused and tiled.

    x:        [N, D]   fp32 / fp16 / bf16, contiguous
    codebook: [K, D]   same dtype, contiguous
    norms:    [K]      fp32, ||e_k||^2 (``_sq_norms_kernel``, one pass over the codebook), or computed
                       in the scan from the code tiles it loads anyway (``FUSED_NORMS``)

* ``_nearest_kernel`` (grid ``(cdiv(N, BLOCK_M),)``): for each tile of ``BLOCK_N`` codes the
  products ``x . e`` of the program's ``BLOCK_M`` rows come from ``tl.dot`` over ``BLOCK_D`` chunks
  (tensor cores; fp32 in IEEE precision, fp16/bf16 natively with an fp32 accumulator); the score
  ``||e||^2 - 2 x.e`` feeds a running minimum per row (a later tile must be strictly better, and
  ``tl.min`` breaks ties to the left: ties go to the lowest index). The epilogue gathers the
  winning code rows and writes ``sum((x - e)^2)`` (no cancellation) and the index. The codebook is
  read once per row tile. ``X_RESIDENT`` (``D <= BLOCK_D``): the row tile is loaded once per
  program and kept in registers for every code tile and the epilogue (fp32 then uses 32-code
  tiles); otherwise it is re-read per code tile and chunk (from L1/L2 on a GPU).
  Used for small problems (``N K D <= SMALL_WORK``, with ``FUSED_NORMS``: one launch in all), from
  ``LARGE_N`` rows on (at least ``SPLIT_TARGET_PROGRAMS`` row tiles) and for a single code tile.
* Otherwise below ``LARGE_N`` rows, split over codes: ``_nearest_split_kernel`` (grid
  ``(cdiv(N, BLOCK_M), splits)``) runs the same scan over one contiguous, tile-aligned slice of the
  codebook and writes a partial (best score, best index) per row and split to an fp32 / int32
  workspace ``[splits, N]``; ``_nearest_reduce_kernel`` (grid ``cdiv(N, REDUCE_BLOCK_M)``) takes the
  minimum over the splits in order (a later split must be strictly better: ties go to the lowest
  index, as in one pass) and does the epilogue (direct distance to the winner). The row tile keeps
  64 rows, so the codebook is read ``cdiv(N, 64)`` times instead of ``cdiv(N, 16)`` with the former
  16-row tiles, and the splits give the parallelism the 16-row tiles were there for (see
  :func:`nearest_plan`).
* ``_sample_kernel`` (grid ``(cdiv(N, BLOCK_M), cdiv(S, BLOCK_S))``; 64 rows at fp32 and on sm_90 at
  fp16/bf16 for wgmma, else 32; norms fused except on sm_90 at fp16/bf16): the same tiles give the
  logits ``(2 x.e - ||e||^2) / temperature`` (``-||x||^2 / t`` is a per-row constant); for each of the
  program's samples a Gumbel variate per (row, code) is added and a running arg-max kept: argmax
  of logit + Gumbel is an exact draw from the softmax. The noise is Philox4x32-10 keyed by the seed
  with counter ``(code, row, sample // 4, 0)``, whose four outputs serve samples ``4q .. 4q + 3``:
  it depends only on (seed, row, sample, code), not on the block sizes. Nothing of size ``N x K``
  is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

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

OP = "vq"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Feature chunk of the dot products: the next power of two of D, clamped. fp32 dots (IEEE, on the
# FMA units) skip 32 and run unpipelined (num_stages=1): the other combinations spill on sm_80/sm_90.
BLOCK_D_CHOICES = {torch.float32: (16, 64), torch.float16: (16, 32, 64), torch.bfloat16: (16, 32, 64)}
NUM_STAGES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 2}
NEAREST_BLOCK_M = 64  # rows per program of the nearest-code scan (both paths)
NEAREST_BLOCK_N = 64
# fp32 with the row tile resident (D <= BLOCK_D): 32 codes per tile (64 x 64 spills 16-40 B on sm_80
# / sm_90 with the resident tile; 64 x 32 with 8 warps: 80 registers, no spill, 37.5 % occupancy).
RESIDENT_BLOCK_N = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
# Programs the split path aims for: about two per SM on an A100 (108 SMs) / H100 (132 SMs); the
# 64-row tiles run 2 to 4 blocks per SM (compile check), so this is at most one wave. From
# LARGE_N rows (256 row tiles of 64) the row tiles alone give that many programs: one pass, no split.
SPLIT_TARGET_PROGRAMS = 256
LARGE_N = NEAREST_BLOCK_M * (SPLIT_TARGET_PROGRAMS - 1) + 1  # 16,321
SMALL_WORK = 1 << 22  # N K D multiply-adds up to which one fused launch does it all (nearest_plan)
REDUCE_BLOCK_M = 32  # rows per program of the reduction over the splits
REDUCE_BLOCK_D = 64
LEGACY_BLOCK_M = 16  # the former small-N tile: only for the "before" traffic launch cases
# Sampler rows per program: fp32 64 (the codebook is issued once per row tile; 64 x 32 with 8 warps
# spills nothing on sm_80 / sm_90 at BLOCK_D 16 or 64: 127-128 registers, 25 % occupancy, as the
# former 32 x 32 with 4 warps), fp16/bf16 32 (sm_80 and the default row; sm_90: 64 for wgmma).
SAMPLE_BLOCK_M = {torch.float32: 64, torch.float16: 32, torch.bfloat16: 32}
SAMPLE_BLOCK_M_HGMMA = 64  # sm_90 fp16/bf16: wgmma's 64 rows per warpgroup
SAMPLE_BLOCK_N = 32
# Small sampling launches (at most SAMPLE_SMALL_PROGRAMS programs of 64 rows x 16 samples: fewer
# than half the SMs of an A100 / H100, so each SM runs at most one program whatever the occupancy):
# 64 x 64 tiles, norms fused. The row tile is re-read once per code tile, so 64 codes halve that;
# the price, 185-252 registers (12.5 % occupancy, no spill), costs nothing at one program per SM.
SAMPLE_SMALL_PROGRAMS = 64
SAMPLE_SMALL_BLOCK = 64
SAMPLE_BLOCK_S = 16  # samples per program (a second grid axis covers more)
NORMS_BLOCK_K = 64
NORMS_BLOCK_D = 64
NUM_WARPS = 4
# Warps per program, chosen so that no configuration spills on sm_80 / sm_90 (compile check): 8 for
# the 64-row nearest tiles and the samplers (the former 32-row fp32 sampler used 4).
NEAREST_WARPS = {16: 4, 64: 8}
REDUCE_WARPS = 4
SAMPLE_WARPS = {torch.float32: 8, torch.float16: 8, torch.bfloat16: 8}


# Per-architecture tile tables (issue #15 item 3), chosen from the compile check
# (``compile_check --filter vq``; the facts and the reason per row are in benchmarks/notes/vq.md).
# Scan kernels (``_nearest_kernel``, ``_nearest_split_kernel``, same tiles): arch -> dtype ->
# (BLOCK_D choices, num_warps, num_stages, extra num_stages offered for the fixed BLOCK_D or None).
# The 64 x 64 tile stays (wgmma's 64 rows per warpgroup on sm_90; the split plan counts on it).
_SCAN_80 = {
    torch.float32: (BLOCK_D_CHOICES[torch.float32], 8, 1, None),
    torch.float16: (BLOCK_D_CHOICES[torch.float16], 8, 2, None),
    torch.bfloat16: (BLOCK_D_CHOICES[torch.bfloat16], 8, 2, None),
}
SCAN_TABLE = {
    80: _SCAN_80,
    # sm_90: fp32 drops BLOCK_D = 16 (the one-pass kernel spills 12 B there; D <= 16 takes the
    # 64-wide chunk, masked); fp16/bf16 also offer 3 stages for the fixed chunk (228 KB of shared
    # memory per SM; occupancy stays register-limited).
    90: {
        torch.float32: ((64,), 8, 1, None),
        torch.float16: (BLOCK_D_CHOICES[torch.float16], 8, 2, 3),
        torch.bfloat16: (BLOCK_D_CHOICES[torch.bfloat16], 8, 2, 3),
    },
    DEFAULT_ARCH: _SCAN_80,
}
# Sampler (fixed per architecture, not autotuned): arch -> dtype -> (num_warps, BLOCK_D choices,
# BLOCK_M, FUSED_NORMS); stages NUM_STAGES[dtype]. FUSED_NORMS: ||e||^2 from the code tiles, no
# separate pass over the codebook (its registers cost no occupancy on sm_80: fp32 128, fp16/bf16
# 104-109 registers).
_SAMPLE_80 = {dt: (SAMPLE_WARPS[dt], BLOCK_D_CHOICES[dt], SAMPLE_BLOCK_M[dt], 1) for dt in DTYPES}
SAMPLE_TABLE = {
    80: _SAMPLE_80,
    # sm_90 fp16/bf16: 64 rows, the tile per warpgroup that wgmma needs (32 rows ran mma.sync, HMMA);
    # 8 warps (2 warpgroups split the 32 codes) with BLOCK_D = 16: HGMMA, 128 registers, no spill,
    # cp.async, 25 % occupancy. (4 warps: 235-255 registers, 12.5 %; BLOCK_D 32/64 with 8 warps: no
    # spill either but 128-140 registers and 12.5-25 %, so BLOCK_D stays 16 as with the 32-row tile.)
    # The norms come from the separate pass there: fused, 134 registers halve the occupancy (12.5 %).
    90: {
        torch.float32: _SAMPLE_80[torch.float32],
        torch.float16: (8, (16,), SAMPLE_BLOCK_M_HGMMA, 0),
        torch.bfloat16: (8, (16,), SAMPLE_BLOCK_M_HGMMA, 0),
    },
    DEFAULT_ARCH: _SAMPLE_80,
}
SCAN_MAX_CANDIDATES = 3


def scan_candidates(arch: int, dtype: torch.dtype, D: int) -> tuple[TileConfig, ...]:
    """Candidate tiles of the nearest-code scan on ``arch``, the fixed one first: the smallest
    ``BLOCK_D`` choice >= D (else the largest); then, where the row has one, the same chunk with more
    stages; then the next smaller chunk (fewer registers and shared memory, more loop trips)."""
    choices, warps, stages, more_stages = arch_row(SCAN_TABLE, arch)[dtype]
    block_d = next((c for c in choices if c >= D), choices[-1])

    def tile(bd, st):
        resident = D <= bd
        block_n = RESIDENT_BLOCK_N[dtype] if resident else NEAREST_BLOCK_N
        return TileConfig.of(
            warps, st, BLOCK_M=NEAREST_BLOCK_M, BLOCK_N=block_n, BLOCK_D=bd, X_RESIDENT=int(resident)
        )

    out = [tile(block_d, stages)]
    if more_stages is not None:
        out.append(tile(block_d, more_stages))
    smaller = [c for c in choices if c < block_d]
    if smaller:
        out.append(tile(smaller[-1], stages))
    return tuple(out[:SCAN_MAX_CANDIDATES])


def sample_small(N: int, S: int) -> bool:
    """Whether ``vq_sample`` of ``N`` rows and ``S`` samples takes the small-launch tile."""
    return triton.cdiv(N, SAMPLE_SMALL_BLOCK) * triton.cdiv(S, SAMPLE_BLOCK_S) <= SAMPLE_SMALL_PROGRAMS


def sample_config(arch: int, dtype: torch.dtype, D: int, small: bool = False) -> TileConfig:
    """The sampler's tile on ``arch``: the smallest ``BLOCK_D`` choice >= D (else the largest);
    ``small`` (:func:`sample_small`): 64 x 64 with the norms fused."""
    warps, choices, block_m, fused = arch_row(SAMPLE_TABLE, arch)[dtype]
    block_n = SAMPLE_BLOCK_N
    if small:
        block_m, block_n, fused = SAMPLE_SMALL_BLOCK, SAMPLE_SMALL_BLOCK, 1
    return TileConfig.of(
        warps,
        NUM_STAGES[dtype],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=next((c for c in choices if c >= D), choices[-1]),
        BLOCK_S=SAMPLE_BLOCK_S,
        FUSED_NORMS=fused,
    )


@triton.jit
def _sq_norms_kernel(e_ptr, out_ptr, K, D, stride_e, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = kmask[:, None] & (ds[None, :] < D)
        v = tl.load(e_ptr + ks[:, None].to(tl.int64) * stride_e + ds[None, :], mask=m, other=0.0).to(
            tl.float32
        )
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + ks, acc, mask=kmask)


@triton.jit
def _dot_acc(xt, et, acc):
    if xt.dtype == tl.float32:
        return tl.dot(xt, et, acc, input_precision="ieee")
    return tl.dot(xt, et, acc)


@triton.jit
def _load_x_chunk(x_ptr, rows64, rmask, d0, D, stride_x, BLOCK_D: tl.constexpr):
    """``[BLOCK_M, BLOCK_D]`` chunk of the row tile at feature ``d0`` (zero outside)."""
    ds = d0 + tl.arange(0, BLOCK_D)
    return tl.load(
        x_ptr + rows64[:, None] * stride_x + ds[None, :], mask=rmask[:, None] & (ds[None, :] < D), other=0.0
    )


@triton.jit
def _tile_dots(
    x_ptr,
    e_ptr,
    x_res,
    rows64,
    rmask,
    ks64,
    kmask,
    D,
    stride_x,
    stride_e,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    FUSED_NORMS: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` fp32 products of the row tile with the code tile, and (``FUSED_NORMS``)
    the ``[BLOCK_N]`` fp32 squared norms of the codes from the same loads (else zeros).
    ``X_RESIDENT`` (``D <= BLOCK_D``): ``x_res`` is the row tile, loaded once per program by the
    caller; the code tile is one chunk. Otherwise the row tile is re-loaded per chunk."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    en = tl.zeros([BLOCK_N], dtype=tl.float32)
    if X_RESIDENT:
        ds = tl.arange(0, BLOCK_D)
        et = tl.load(
            e_ptr + ks64[None, :] * stride_e + ds[:, None], mask=kmask[None, :] & (ds[:, None] < D), other=0.0
        )
        acc = _dot_acc(x_res, et, acc)
        if FUSED_NORMS:
            ef = et.to(tl.float32)
            en = tl.sum(ef * ef, axis=0)
    else:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            xt = tl.load(
                x_ptr + rows64[:, None] * stride_x + ds[None, :],
                mask=rmask[:, None] & dmask[None, :],
                other=0.0,
            )
            et = tl.load(
                e_ptr + ks64[None, :] * stride_e + ds[:, None],
                mask=kmask[None, :] & dmask[:, None],
                other=0.0,
            )
            acc = _dot_acc(xt, et, acc)
            if FUSED_NORMS:
                ef = et.to(tl.float32)
                en += tl.sum(ef * ef, axis=0)
    return acc, en


@triton.jit
def _scan_codes(
    x_ptr,
    e_ptr,
    norms_ptr,
    x_res,
    rows64,
    rmask,
    k_begin,
    k_end,
    D,
    stride_x,
    stride_e,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    FUSED_NORMS: tl.constexpr,
):
    """Running minimum of ``||e||^2 - 2 x.e`` over codes ``k_begin .. k_end - 1`` for the row tile:
    ``(best score [BLOCK_M] fp32, its code [BLOCK_M] int32)``. A later code tile must be strictly
    better and ``tl.min`` breaks ties to the left: ties go to the lowest index. ``||e||^2`` comes
    from ``norms_ptr`` or (``FUSED_NORMS``) from the code tiles themselves."""
    best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_k = tl.zeros([BLOCK_M], dtype=tl.int32) + k_begin
    for k0 in range(k_begin, k_end, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        kmask = ks < k_end
        acc, en = _tile_dots(
            x_ptr,
            e_ptr,
            x_res,
            rows64,
            rmask,
            ks.to(tl.int64),
            kmask,
            D,
            stride_x,
            stride_e,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            X_RESIDENT,
            FUSED_NORMS,
        )
        if not FUSED_NORMS:
            en = tl.load(norms_ptr + ks, mask=kmask, other=0.0)
        score = tl.where(kmask[None, :], en[None, :] - 2.0 * acc, float("inf"))
        tile_min, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_k = tl.where(better, k0 + tile_arg, best_k)
    return best, best_k


@triton.jit
def _write_nearest(
    x_ptr,
    e_ptr,
    idx_ptr,
    dist_ptr,
    x_res,
    rows,
    rows64,
    rmask,
    best_k,
    D,
    stride_x,
    stride_e,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
):
    """Epilogue: the exact distance to the winner (gather its row, sum the squared differences, no
    cancellation) and the int64 index. ``X_RESIDENT``: ``x_res`` is the row tile (one chunk)."""
    dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    bk64 = best_k.to(tl.int64)
    if X_RESIDENT:
        ds = tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (ds[None, :] < D)
        ev = tl.load(e_ptr + bk64[:, None] * stride_e + ds[None, :], mask=m, other=0.0).to(tl.float32)
        diff = x_res.to(tl.float32) - ev
        dist = tl.sum(diff * diff, axis=1)
    else:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (ds[None, :] < D)
            xv = tl.load(x_ptr + rows64[:, None] * stride_x + ds[None, :], mask=m, other=0.0).to(tl.float32)
            ev = tl.load(e_ptr + bk64[:, None] * stride_e + ds[None, :], mask=m, other=0.0).to(tl.float32)
            diff = xv - ev
            dist += tl.sum(diff * diff, axis=1)
    tl.store(idx_ptr + rows, bk64, mask=rmask)
    tl.store(dist_ptr + rows, dist, mask=rmask)


@triton.jit
def _nearest_kernel(
    x_ptr,
    e_ptr,
    norms_ptr,
    idx_ptr,
    dist_ptr,
    N,
    K,
    D,
    stride_x,
    stride_e,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    FUSED_NORMS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    x_res = 0.0
    if X_RESIDENT:
        x_res = _load_x_chunk(x_ptr, rows64, rmask, 0, D, stride_x, BLOCK_D)
    _, best_k = _scan_codes(
        x_ptr,
        e_ptr,
        norms_ptr,
        x_res,
        rows64,
        rmask,
        0,
        K,
        D,
        stride_x,
        stride_e,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        X_RESIDENT,
        FUSED_NORMS,
    )
    _write_nearest(
        x_ptr,
        e_ptr,
        idx_ptr,
        dist_ptr,
        x_res,
        rows,
        rows64,
        rmask,
        best_k,
        D,
        stride_x,
        stride_e,
        BLOCK_M,
        BLOCK_D,
        X_RESIDENT,
    )


@triton.jit
def _nearest_split_kernel(
    x_ptr,
    e_ptr,
    norms_ptr,
    part_score_ptr,
    part_idx_ptr,
    N,
    K,
    D,
    stride_x,
    stride_e,
    codes_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    X_RESIDENT: tl.constexpr,
):
    """Program ``(i, s)``: rows ``i * BLOCK_M ..`` against codes ``s * codes_per_split ..`` (a multiple
    of BLOCK_N); writes the partial minimum to ``part_*[s, row]``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    split = tl.program_id(1)
    k_begin = split * codes_per_split
    k_end = tl.minimum(k_begin + codes_per_split, K)
    x_res = 0.0
    if X_RESIDENT:
        x_res = _load_x_chunk(x_ptr, rows64, rmask, 0, D, stride_x, BLOCK_D)
    best, best_k = _scan_codes(
        x_ptr,
        e_ptr,
        norms_ptr,
        x_res,
        rows64,
        rmask,
        k_begin,
        k_end,
        D,
        stride_x,
        stride_e,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        X_RESIDENT,
        False,
    )
    out = split.to(tl.int64) * N + rows64
    tl.store(part_score_ptr + out, best, mask=rmask)
    tl.store(part_idx_ptr + out, best_k, mask=rmask)


@triton.jit
def _nearest_reduce_kernel(
    x_ptr,
    e_ptr,
    part_score_ptr,
    part_idx_ptr,
    idx_ptr,
    dist_ptr,
    N,
    D,
    splits,
    stride_x,
    stride_e,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Minimum over the splits in order (strictly better only: the lowest split, hence the lowest
    index, wins ties), then the epilogue of the one-pass kernel."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    best_k = tl.zeros([BLOCK_M], dtype=tl.int32)
    score_ptrs = part_score_ptr + rows64  # pointers advance by N per split (64-bit, no product)
    idx_ptrs = part_idx_ptr + rows64
    for _ in range(0, splits):
        v = tl.load(score_ptrs, mask=rmask, other=float("inf"))
        k = tl.load(idx_ptrs, mask=rmask, other=0)
        better = v < best
        best = tl.where(better, v, best)
        best_k = tl.where(better, k, best_k)
        score_ptrs += N
        idx_ptrs += N
    _write_nearest(
        x_ptr,
        e_ptr,
        idx_ptr,
        dist_ptr,
        0.0,
        rows,
        rows64,
        rmask,
        best_k,
        D,
        stride_x,
        stride_e,
        BLOCK_M,
        BLOCK_D,
        False,
    )


@triton.jit
def _gumbel(r):
    """Standard Gumbel variate from a uint32: ``-log(E)``, ``E = -log(1 - v) ~ Exp(1)``, v uniform.

    ``v = (r >> 9 + 1/2) / 2^23`` lies in (0, 1) and ``1 - v`` is exact. For ``v < 1/2`` the
    exponential is ``2 atanh(v / (2 - v))`` by its series (relative error < 1e-9), so small E (the
    Gumbel's upper tail, which decides the arg-max) keeps full relative precision even where
    ``tl.log`` is a fast approximation with an absolute error bound near 1.
    """
    v = ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    t = v / (2.0 - v)
    t2 = t * t
    series = 1.0 / 13.0 + t2 * (1.0 / 15.0)
    series = 1.0 / 11.0 + t2 * series
    series = 1.0 / 9.0 + t2 * series
    series = 1.0 / 7.0 + t2 * series
    series = 1.0 / 5.0 + t2 * series
    series = 1.0 / 3.0 + t2 * series
    series = 1.0 + t2 * series
    e = tl.where(v < 0.5, 2.0 * t * series, -tl.log(1.0 - v))
    return -tl.log(e)


@triton.jit
def _argmax_update(best, best_k, logit, r, col, k0):
    """Running arg-max of ``logit + Gumbel(r)`` for the sample in column ``col`` of ``best``."""
    cand = logit + _gumbel(r)
    cmax, carg = tl.max(cand, axis=1, return_indices=True, return_indices_tie_break_left=True)
    upd = col[None, :] & (cmax[:, None] > best)
    return tl.where(upd, cmax[:, None], best), tl.where(upd, (k0 + carg)[:, None], best_k)


@triton.jit
def _sample_kernel(
    x_ptr,
    e_ptr,
    norms_ptr,
    idx_ptr,
    N,
    K,
    D,
    S,
    stride_x,
    stride_e,
    inv_temp,
    seed,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FUSED_NORMS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    s0 = tl.program_id(1) * BLOCK_S
    n_here = tl.minimum(S - s0, BLOCK_S)
    cols = tl.arange(0, BLOCK_S)
    best = tl.full([BLOCK_M, BLOCK_S], float("-inf"), dtype=tl.float32)
    best_k = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.int32)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    ctr_row = rows[:, None] + zero
    for k0 in range(0, K, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        kmask = ks < K
        # FUSED_NORMS: ||e||^2 from the code tiles (the sampling work per (row, code) dwarfs the
        # BLOCK_N x D squares per tile). The row tile is re-loaded per code tile: kept resident,
        # fp32 spills 0.7-2.8 KB at BLOCK_D = 64 and fp16/bf16 lose the pipelined chunk loop (the
        # code loop holds the sampling loop, so it is not innermost).
        acc, en = _tile_dots(
            x_ptr,
            e_ptr,
            0.0,
            rows64,
            rmask,
            ks.to(tl.int64),
            kmask,
            D,
            stride_x,
            stride_e,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            False,
            FUSED_NORMS,
        )
        if not FUSED_NORMS:
            en = tl.load(norms_ptr + ks, mask=kmask, other=0.0)
        logit = tl.where(kmask[None, :], (2.0 * acc - en[None, :]) * inv_temp, float("-inf"))
        ctr_k = ks[None, :] + zero
        # One Philox call gives four uint32: the noise of samples 4q .. 4q + 3 (BLOCK_S % 4 == 0).
        for q in range(0, tl.cdiv(n_here, 4)):
            r0, r1, r2, r3 = tl.philox(seed, ctr_k, ctr_row, zero + (s0 // 4 + q), zero)
            best, best_k = _argmax_update(best, best_k, logit, r0, cols == 4 * q, k0)
            best, best_k = _argmax_update(best, best_k, logit, r1, cols == 4 * q + 1, k0)
            best, best_k = _argmax_update(best, best_k, logit, r2, cols == 4 * q + 2, k0)
            best, best_k = _argmax_update(best, best_k, logit, r3, cols == 4 * q + 3, k0)
    out = idx_ptr + rows64[:, None] * S + (s0 + cols)[None, :]
    tl.store(out, best_k.to(tl.int64), mask=rmask[:, None] & (cols[None, :] < n_here))


# ---------------------------------------------------------------------------------------------
# launchers


# Autotuned on GPUs over ``scan_candidates`` (key: K, D; Triton adds the dtype; not N, which changes
# from batch to batch). Both kernels write each output (indices/distances, or the split workspace)
# once and read none: benchmarking on the real arguments is harmless, no reset_to_zero needed.
# Not autotuned: the sampler (one configuration per architecture), the norms and the reduction.
_NEAREST = TunedKernel(_nearest_kernel, key=["K", "D"])
_NEAREST_SPLIT = TunedKernel(_nearest_split_kernel, key=["K", "D"])


@dataclass(frozen=True)
class NearestPlan:
    """How ``vq_nearest`` launches: ``splits == 1`` is one pass (``_nearest_kernel``), otherwise the
    codes are split into ``splits`` slices of ``codes_per_split`` (a multiple of ``NEAREST_BLOCK_N``)
    and reduced by a second kernel. ``fused_norms`` (one pass only): ``||e||^2`` from the scan's code
    tiles instead of a separate pass over the codebook."""

    block_m: int
    splits: int
    codes_per_split: int
    fused_norms: bool = False


def nearest_plan(N: int, K: int, D: int) -> NearestPlan:
    """The launch of ``vq_nearest`` for ``N`` rows, ``K`` codes of ``D`` features.

    Traffic (no cache, element size s): one pass over 64-row tiles issues the codebook
    ``cdiv(N, 64) K D s`` times (a quarter of the former 16-row tiles' ``cdiv(N, 16) K D s``, whose
    only purpose was more programs at small N). Splitting over codes issues the codebook as often
    and ``x`` once per slice (``D <= BLOCK_D``: the row tile stays in registers across a slice's code
    tiles; else once per code tile on either path), plus a workspace of 8 bytes per row and split
    written and read once, and the reduction's epilogue reads ``x`` again; the separate norms pass
    reads the codebook once more. That is the price of parallelism, so:

    * Small problems (``N K D <= SMALL_WORK``, 4.2 M multiply-adds: the one pass's 64-row programs
      then scan at most 64 K D <= 2^22 products each, microseconds, comparable to one launch):
      one pass with the norms fused into the scan, one launch in all; ``x`` and the codebook are
      issued ``1`` and ``cdiv(N, 64)`` times.
    * Otherwise, whenever the row tiles alone give fewer than ``SPLIT_TARGET_PROGRAMS`` programs
      (``N < LARGE_N``), the codes are split so that row tiles x splits reaches it (at most one code
      tile per split); from ``LARGE_N`` rows one pass (the norms pass reads ``K D s`` against the
      ``N D s`` of ``x``)."""
    if N * K * D <= SMALL_WORK:
        return NearestPlan(
            NEAREST_BLOCK_M, 1, triton.cdiv(K, NEAREST_BLOCK_N) * NEAREST_BLOCK_N, fused_norms=True
        )
    return split_plan(N, K)


def split_plan(N: int, K: int) -> NearestPlan:
    """The plan above ``SMALL_WORK``: split over codes up to ``SPLIT_TARGET_PROGRAMS`` programs."""
    row_tiles = triton.cdiv(N, NEAREST_BLOCK_M)
    code_tiles = triton.cdiv(K, NEAREST_BLOCK_N)
    splits = min(code_tiles, triton.cdiv(SPLIT_TARGET_PROGRAMS, row_tiles))  # 1 from LARGE_N rows on
    tiles_per_split = triton.cdiv(code_tiles, splits)
    splits = triton.cdiv(code_tiles, tiles_per_split)  # no empty slice
    return NearestPlan(NEAREST_BLOCK_M, splits, tiles_per_split * NEAREST_BLOCK_N)


def _check(x: torch.Tensor, codebook: torch.Tensor) -> None:
    assert x.dim() == 2 and codebook.dim() == 2 and x.shape[1] == codebook.shape[1]
    assert x.is_contiguous() and codebook.is_contiguous() and x.dtype == codebook.dtype and x.dtype in _TL


def code_sq_norms(codebook: torch.Tensor) -> torch.Tensor:
    """``[K]`` fp32 squared norms of the codes."""
    K, D = codebook.shape
    norms = _alloc.empty((K,), dtype=torch.float32, device=codebook.device)
    _sq_norms_kernel[(triton.cdiv(K, NORMS_BLOCK_K),)](
        codebook,
        norms,
        K,
        D,
        codebook.stride(0),
        BLOCK_K=NORMS_BLOCK_K,
        BLOCK_D=NORMS_BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return norms


def vq_nearest(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    distances: torch.Tensor,
    *,
    plan: NearestPlan | None = None,
) -> None:
    """Writes int64 ``indices [N]`` and fp32 ``distances [N]`` (allocated by the caller). ``plan``
    (tests and traffic cases only) overrides :func:`nearest_plan`."""
    _check(x, codebook)
    N, D = x.shape
    K = codebook.shape[0]
    if N == 0:
        return
    plan = plan or nearest_plan(N, K, D)
    fused = plan.fused_norms and plan.splits == 1
    norms = distances if fused else code_sq_norms(codebook)  # fused: a placeholder, never read
    cands = scan_candidates(launch_arch(x.device), x.dtype, D)
    if plan.block_m != NEAREST_BLOCK_M:  # the former 16-row tiles (tests, "before" traffic cases): fixed
        c = cands[0]
        kw = {**c.kwargs, "BLOCK_M": plan.block_m, "BLOCK_N": NEAREST_BLOCK_N, "X_RESIDENT": 0}
        cands = (TileConfig.of(NEAREST_WARPS[plan.block_m], c.num_stages, **kw),)
    if plan.splits == 1:
        _NEAREST.launch(
            lambda m: (triton.cdiv(N, m["BLOCK_M"]),),
            cands,
            x, codebook, norms, indices, distances, N, K, D, x.stride(0), codebook.stride(0),
            device=x.device, FUSED_NORMS=int(fused),
        )  # fmt: skip
        return
    part_score = _alloc.empty((plan.splits, N), dtype=torch.float32, device=x.device)
    part_idx = _alloc.empty((plan.splits, N), dtype=torch.int32, device=x.device)
    _NEAREST_SPLIT.launch(
        lambda m: (triton.cdiv(N, m["BLOCK_M"]), plan.splits),
        cands,
        x, codebook, norms, part_score, part_idx, N, K, D, x.stride(0), codebook.stride(0),
        plan.codes_per_split,
        device=x.device,
    )  # fmt: skip
    _nearest_reduce_kernel[(triton.cdiv(N, REDUCE_BLOCK_M),)](
        x,
        codebook,
        part_score,
        part_idx,
        indices,
        distances,
        N,
        D,
        plan.splits,
        x.stride(0),
        codebook.stride(0),
        BLOCK_M=REDUCE_BLOCK_M,
        BLOCK_D=REDUCE_BLOCK_D,
        num_warps=REDUCE_WARPS,
        num_stages=1,
    )


def vq_sample(
    x: torch.Tensor,
    codebook: torch.Tensor,
    num_samples: int,
    temperature: float,
    seed: int,
    indices: torch.Tensor,
) -> None:
    """Writes int64 ``indices [N, num_samples]`` (allocated by the caller)."""
    _check(x, codebook)
    N, D = x.shape
    K = codebook.shape[0]
    if N == 0:
        return
    cfg = sample_config(launch_arch(x.device), x.dtype, D, sample_small(N, num_samples))
    if cfg.kwargs["FUSED_NORMS"]:  # a placeholder, never read
        norms = _alloc.empty((1,), dtype=torch.float32, device=x.device)
    else:
        norms = code_sq_norms(codebook)
    grid = (triton.cdiv(N, cfg.kwargs["BLOCK_M"]), triton.cdiv(num_samples, SAMPLE_BLOCK_S))
    _sample_kernel[grid](
        x,
        codebook,
        norms,
        indices,
        N,
        K,
        D,
        num_samples,
        x.stride(0),
        codebook.stride(0),
        1.0 / temperature,
        seed,
        **cfg.launch_kwargs(),
    )


# ---------------------------------------------------------------------------------------------
# registry


D_SWEEP = (1, 16, 17, 32, 33, 64, 65, 384)  # feature sizes covering every BLOCK_D rule


def _tiles_by_arch(choose) -> dict[TileConfig, tuple[int, ...] | None]:
    archs: dict[TileConfig, set[int]] = {}
    for arch in TABLE_ARCHS:
        for D in D_SWEEP:
            for c in choose(arch, D):
                archs.setdefault(c, set()).add(arch)
    order = sorted(archs, key=lambda c: (c.kwargs["BLOCK_D"], c.num_warps, c.num_stages or 0))
    return {c: None if archs[c] == set(TABLE_ARCHS) else tuple(sorted(archs[c])) for c in order}


def scan_table_tiles(dtype: torch.dtype) -> dict[TileConfig, tuple[int, ...] | None]:
    """Every scan tile ``scan_candidates`` can offer for ``dtype`` on the checked architectures, with
    the architectures that offer it (None: all): the compile specs of both scan kernels."""
    return _tiles_by_arch(lambda arch, D: scan_candidates(arch, dtype, D))


def sample_table_tiles(dtype: torch.dtype) -> dict[TileConfig, tuple[int, ...] | None]:
    return _tiles_by_arch(
        lambda arch, D: (sample_config(arch, dtype, D), sample_config(arch, dtype, D, True))
    )


@register_compile_specs(OP)
def _compile_specs() -> list[CompileSpec]:
    specs = []
    for dt in DTYPES:
        t = _TL[dt]
        specs.append(
            CompileSpec(
                name=f"vq_sq_norms[{t},BLOCK_K={NORMS_BLOCK_K},BLOCK_D={NORMS_BLOCK_D}]",
                kernel=_sq_norms_kernel,
                signature={
                    "e_ptr": f"*{t}",
                    "out_ptr": "*fp32",
                    "K": "i32",
                    "D": "i32",
                    "stride_e": "i32",
                    "BLOCK_K": "constexpr",
                    "BLOCK_D": "constexpr",
                },
                constexprs={"BLOCK_K": NORMS_BLOCK_K, "BLOCK_D": NORMS_BLOCK_D},
                num_warps=NUM_WARPS,
            )
        )
        scan_signature = {
            "x_ptr": f"*{t}",
            "e_ptr": f"*{t}",
            "norms_ptr": "*fp32",
            "N": "i32",
            "K": "i32",
            "D": "i32",
            "stride_x": "i32",
            "stride_e": "i32",
            "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr",
            "BLOCK_D": "constexpr",
            "X_RESIDENT": "constexpr",
        }
        specs.append(
            CompileSpec(
                name=f"vq_nearest_reduce[{t},BLOCK_M={REDUCE_BLOCK_M},BLOCK_D={REDUCE_BLOCK_D}]",
                kernel=_nearest_reduce_kernel,
                signature={
                    "x_ptr": f"*{t}",
                    "e_ptr": f"*{t}",
                    "part_score_ptr": "*fp32",
                    "part_idx_ptr": "*i32",
                    "idx_ptr": "*i64",
                    "dist_ptr": "*fp32",
                    "N": "i32",
                    "D": "i32",
                    "splits": "i32",
                    "stride_x": "i32",
                    "stride_e": "i32",
                    "BLOCK_M": "constexpr",
                    "BLOCK_D": "constexpr",
                },
                constexprs={"BLOCK_M": REDUCE_BLOCK_M, "BLOCK_D": REDUCE_BLOCK_D},
                num_warps=REDUCE_WARPS,
                num_stages=1,
            )
        )
        for tile, archs in scan_table_tiles(dt).items():
            block_d = tile.kwargs["BLOCK_D"]
            tile_name = f"{t},BLOCK_M={NEAREST_BLOCK_M},BLOCK_N={tile.kwargs['BLOCK_N']},BLOCK_D={block_d}"
            tile_name += f",X_RESIDENT={tile.kwargs['X_RESIDENT']}"
            if tile.num_stages != NUM_STAGES[dt]:
                tile_name += f",stages={tile.num_stages}"
            for fused in (0, 1):  # nearest_plan fuses the norms for small problems, at any tile
                specs.append(
                    CompileSpec(
                        name=f"vq_nearest[{tile_name},FUSED_NORMS={fused}]",
                        kernel=_nearest_kernel,
                        signature={
                            **scan_signature,
                            "idx_ptr": "*i64",
                            "dist_ptr": "*fp32",
                            "FUSED_NORMS": "constexpr",
                        },
                        constexprs={**tile.kwargs, "FUSED_NORMS": fused},
                        num_warps=tile.num_warps,
                        num_stages=tile.num_stages,
                        uses_dot=True,
                        archs=archs,
                    )
                )
            specs.append(
                CompileSpec(
                    name=f"vq_nearest_split[{tile_name}]",
                    kernel=_nearest_split_kernel,
                    signature={
                        **scan_signature,
                        "part_score_ptr": "*fp32",
                        "part_idx_ptr": "*i32",
                        "codes_per_split": "i32",
                    },
                    constexprs=tile.kwargs,
                    num_warps=tile.num_warps,
                    num_stages=tile.num_stages,
                    uses_dot=True,
                    archs=archs,
                )
            )
        for tile, archs in sample_table_tiles(dt).items():
            block_d, block_m = tile.kwargs["BLOCK_D"], tile.kwargs["BLOCK_M"]
            warps = "" if tile.num_warps == SAMPLE_WARPS[dt] else f",warps={tile.num_warps}"
            specs.append(
                CompileSpec(
                    name=f"vq_sample[{t},BLOCK_M={block_m},BLOCK_N={tile.kwargs['BLOCK_N']},BLOCK_D={block_d},"
                    f"BLOCK_S={SAMPLE_BLOCK_S},FUSED_NORMS={tile.kwargs['FUSED_NORMS']}{warps}]",
                    kernel=_sample_kernel,
                    signature={
                        "x_ptr": f"*{t}",
                        "e_ptr": f"*{t}",
                        "norms_ptr": "*fp32",
                        "idx_ptr": "*i64",
                        "N": "i32",
                        "K": "i32",
                        "D": "i32",
                        "S": "i32",
                        "stride_x": "i32",
                        "stride_e": "i32",
                        "inv_temp": "fp32",
                        "seed": "i32",
                        "BLOCK_M": "constexpr",
                        "BLOCK_N": "constexpr",
                        "BLOCK_D": "constexpr",
                        "BLOCK_S": "constexpr",
                        "FUSED_NORMS": "constexpr",
                    },
                    constexprs=tile.kwargs,
                    num_warps=tile.num_warps,
                    num_stages=tile.num_stages,
                    uses_dot=True,
                    archs=archs,
                )
            )
    return specs


@register_launch_cases(OP)
def _launch_cases() -> list[LaunchCase]:
    from prompt_kernels.floors import vq_nearest_floors

    gen = torch.Generator().manual_seed(0)
    cases = []
    # Small problems (the launcher's plan: one pass, norms fused; for comparison at the same shapes
    # the plans of larger problems, the split over codes and the large-N one pass with the norms
    # pass, and "before": the former one pass over 16-row tiles).
    for N, K, D in ((40, 70, 48), (200, 300, 48)):
        x = torch.randn(N, D, generator=gen)
        codebook = torch.randn(K, D, generator=gen)
        idx = _alloc.empty((N,), dtype=torch.int64, device=x.device)
        dist = _alloc.empty((N,), dtype=torch.float32, device=x.device)
        near = vq_nearest_floors(N, K, D, 4)
        plan = nearest_plan(N, K, D)
        assert plan.splits == 1 and plan.fused_norms  # small problems: one fused launch
        split = split_plan(N, K)
        variants = [
            (" (one pass, fused norms: the small-problem path)", None),
            (f" (split {split.splits}x{split.codes_per_split} codes: the mid-size path)", split),
            (" (before: one pass, 16-row tiles)", NearestPlan(LEGACY_BLOCK_M, 1, K)),
        ]
        if N > 64:
            variants.append(
                (
                    " (one pass, 64-row tiles, norms pass: the large-N path)",
                    NearestPlan(NEAREST_BLOCK_M, 1, K),
                )
            )
        for suffix, p in variants:
            cases.append(
                LaunchCase(
                    name=f"vq_nearest fwd fp32 x[{N},{D}] codebook[{K},{D}]{suffix}",
                    op="vq_nearest",
                    direction="forward",
                    launch=lambda x=x, codebook=codebook, idx=idx, dist=dist, p=p: vq_nearest(
                        x, codebook, idx, dist, plan=p
                    ),
                    floor_bytes=near.forward_bytes,
                    floor_flops=near.forward_flops,
                    scale_note="bytes (N*D + K*D)*4 + 12*N; flops 2*N*K*D; codebook issued cdiv(N, BLOCK_M) "
                    "times (+1 for a norms pass), x once per program (D <= BLOCK_D) and once more for "
                    "the winner's distance after a split; split adds 16*N*splits B of partials",
                )
            )
    N, K, D, S = 40, 70, 48, 3
    x = torch.randn(N, D, generator=gen)
    codebook = torch.randn(K, D, generator=gen)
    samples = _alloc.empty((N, S), dtype=torch.int64, device=x.device)
    cases.append(
        LaunchCase(
            name=f"vq_sample fwd fp32 x[{N},{D}] codebook[{K},{D}] S={S}",
            op="vq_sample",
            direction="forward",
            launch=lambda: vq_sample(x, codebook, S, 10.0, 1234, samples),
            # The launcher writes only the indices: the floors of the lookup part.
            floor_bytes=4 * (N * D + K * D) + 8 * N * S,
            floor_flops=2 * N * K * D,
            scale_note="bytes (N*D + K*D)*4 + 8*N*S; flops 2*N*K*D (sampling work not counted)",
        )
    )
    return cases
