"""Triton kernels of ``prompt_pool``: masked adaptive average pooling x [B, T, D] -> out [B, L, D].

Three kernels:

* ``_index_kernel`` (grid ``(B,)``, only with a mask): scans the mask of one sequence in chunks of
  ``BLOCK_T`` with a running count and writes ``n[b]`` (real tokens) and either ``pos[b, r]`` (the
  position of the r-th real token, forward) or ``rank[b, t]`` (the rank of token t, -1 for padding,
  backward). O(B * T) int32 traffic, one launch.
* ``_forward_kernel`` (grid ``(B * L, cdiv(D, BLOCK_D))``): bin j covers ranks ``s = floor(j n / L)``
  to ``e = ceil((j + 1) n / L)``; the program gathers the rows ``x[b, pos[s .. e)]`` in tiles of
  ``BLOCK_R`` rows, sums them in fp32 and divides by ``e - s``. x is read once, up to the one token
  two neighbouring bins share (L2 hits in practice).
* ``_backward_kernel`` (grid ``(B * cdiv(T, BLOCK_TOK), cdiv(D, BLOCK_D))``): a program per tile of
  ``BLOCK_TOK`` tokens of one sequence. The real tokens of a tile have consecutive ranks
  ``r_lo .. r_hi``, so the bins they lie in are ``floor(r_lo L / n) <= j < ceil((r_hi + 1) L / n)``; the
  program loads each of those grad_out rows once, scales it by ``1 / (e_j - s_j)`` and adds it to
  the tokens of the tile with ``s_j <= r < e_j`` (a token on a bin boundary gets both bins' terms, in
  ascending j as before). grad_out is read about once (a bin row straddling two tiles twice), not
  once per token; padding tokens (rank -1) are in no bin and get exact zeros. No atomics: each
  program owns its tile of grad_x.

Without a mask there is no index pass: ``pos = rank = arange(T)`` and ``n = T``.
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

OP = "prompt_pool"
# Mask dtypes the index kernel reads directly; other integer masks become bool in the launcher.
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_T_CHOICES = (128, 1024)  # index kernel: mask chunk
BLOCK_D_CHOICES = (64, 256)  # features per program
BLOCK_R_CHOICES = (4, 8)  # forward: x rows gathered per step
# backward: tokens per program, as BLOCK_TOK * BLOCK_D elements of grad_x (16 or 32 a thread at 4 warps:
# 40-72 or 92-126 registers, each element holding its accumulator, address and mask): 8 / 16 tokens
# at BLOCK_D = 256, 32 / 64 at BLOCK_D = 64
BWD_TILE_ELEMS = (2048, 4096)
NUM_WARPS = 4

_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TL_MASK = {torch.bool: "i1", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def _index_kernel(
    mask_ptr,
    pos_ptr,
    rank_ptr,
    n_ptr,
    T,
    stride_mb,
    stride_mt,
    BLOCK_T: tl.constexpr,
    WRITE_POS: tl.constexpr,
    WRITE_RANK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    count = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        inside = t < T
        real = (tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=inside, other=0) != 0) & inside
        real_i = real.to(tl.int32)
        rank = count + tl.cumsum(real_i, axis=0) - real_i
        if WRITE_POS:
            tl.store(pos_ptr + b * T + rank, t.to(tl.int32), mask=real)
        if WRITE_RANK:
            tl.store(rank_ptr + b * T + t, tl.where(real, rank, -1), mask=inside)
        count += tl.sum(real_i, axis=0)
    tl.store(n_ptr + b, count)


@triton.jit
def _forward_kernel(
    x_ptr,
    pos_ptr,
    n_ptr,
    out_ptr,
    T,
    D,
    L,
    stride_xb,
    stride_xt,
    stride_xd,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * L + j
    b = row // L
    j = row % L
    if HAS_MASK:
        n = tl.load(n_ptr + b).to(tl.int64)
    else:
        n = j * 0 + T  # int64 even when T is specialised to a constant
    s = (j * n) // L
    e = ((j + 1) * n + L - 1) // L
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    x_row = x_ptr + b * stride_xb + d[None, :] * stride_xd
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(s, e, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < e
        if HAS_MASK:
            p = tl.load(pos_ptr + b * T + r, mask=r_ok, other=0).to(tl.int64)
        else:
            p = r
        v = tl.load(x_row + p[:, None] * stride_xt, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float32), axis=0)
    out = acc / tl.maximum(e - s, 1).to(tl.float32)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _backward_kernel(
    grad_out_ptr,
    rank_ptr,
    n_ptr,
    grad_x_ptr,
    T,
    D,
    L,
    stride_gb,
    stride_gl,
    stride_gd,
    HAS_MASK: tl.constexpr,
    BLOCK_TOK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)  # b * cdiv(T, BLOCK_TOK) + token tile
    tiles = tl.cdiv(T, BLOCK_TOK)
    b = tile // tiles
    t0 = (tile % tiles) * BLOCK_TOK  # the tile's first token
    tok = tl.arange(0, BLOCK_TOK)
    t_ok = tok < T - t0
    # ranks and bin bounds fit int32 (< T); products j * n are taken in int64
    if HAS_MASK:
        n = tl.load(n_ptr + b).to(tl.int64)
        r = tl.load(rank_ptr + b * T + t0 + tok, mask=t_ok, other=-1)
    else:
        n = b * 0 + T  # int64 even when T is specialised to a constant
        r = tl.where(t_ok, (t0 + tok).to(tl.int32), -1)
    n_safe = tl.maximum(n, 1)
    r_lo = tl.min(tl.where(r >= 0, r, n_safe.to(tl.int32)), axis=0).to(tl.int64)  # n: no real token
    r_hi = tl.max(r, axis=0).to(tl.int64)  # -1 when the tile has no real token
    j0 = (r_lo * L) // n_safe  # the first bin with e_j > r_lo (L: none)
    j1 = tl.minimum(((r_hi + 1) * L + n_safe - 1) // n_safe, L)  # past the last bin with s_j <= r_hi
    j1 = tl.where(r_hi >= 0, j1, j0)  # only padding: no bins, zeros
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    g_row = grad_out_ptr + b * stride_gb + d * stride_gd
    acc = tl.zeros((BLOCK_TOK, BLOCK_D), dtype=tl.float32)
    for j in range(j0, j1):
        s = ((j * n) // L).to(tl.int32)
        e = (((j + 1) * n + L - 1) // L).to(tl.int32)
        g = tl.load(g_row + j * stride_gl, mask=d_ok, other=0.0).to(tl.float32)
        g = g / tl.maximum(e - s, 1).to(tl.float32)
        in_bin = (r >= s) & (r < e)  # padding (r = -1) is in no bin
        acc += tl.where(in_bin[:, None], g[None, :], 0.0)
    out = grad_x_ptr + (b * T + t0) * D  # int64 tile base, int32 offsets inside (BLOCK_TOK * D < 2**31)
    tl.store(
        out + tok[:, None] * D + d[None, :],
        acc.to(grad_x_ptr.dtype.element_ty),
        mask=t_ok[:, None] & d_ok[None, :],
    )


# Per-architecture tile table (issue #15 item 3), from the compile check (``compile_check --filter
# prompt_pool``; facts and reasons in benchmarks/notes/prompt_pool.md). No tl.dot and no pipelined
# loads: the facts (no spills; index and forward 27-54 registers, backward 40-126 registers and
# <= 8 KB shared memory) are about the same on sm_80 and sm_90, so the rows are equal:
# arch -> (num_warps, max candidates).
POOL_TABLE = {80: (NUM_WARPS, 3), 90: (NUM_WARPS, 3), DEFAULT_ARCH: (NUM_WARPS, 3)}


def forward_candidates(arch: int, D: int, T: int, L: int) -> tuple[TileConfig, ...]:
    """Forward tiles, the fixed one first: ``BLOCK_D`` 64 for ``D <= 64`` else 256, ``BLOCK_R`` 4 when
    every bin fits in 4 rows else 8; then the other ``BLOCK_R`` (BLOCK_R = 8 with 256 columns costs
    occupancy: 62-75 % against 75-100 %) and, for ``D > 64``, ``BLOCK_D = 64`` (4x the programs, for
    few output rows ``B * L``)."""
    warps, most = arch_row(POOL_TABLE, arch)
    bd, br = _block_d(D), _block_r(T, L)
    other_r = next(r for r in BLOCK_R_CHOICES if r != br)
    out = [TileConfig.of(warps, BLOCK_R=br, BLOCK_D=bd), TileConfig.of(warps, BLOCK_R=other_r, BLOCK_D=bd)]
    if bd != BLOCK_D_CHOICES[0]:
        out.append(TileConfig.of(warps, BLOCK_R=br, BLOCK_D=BLOCK_D_CHOICES[0]))
    return tuple(out[:most])


def backward_candidates(arch: int, D: int) -> tuple[TileConfig, ...]:
    """Backward tiles, the fixed one first: ``BLOCK_D`` as the forward and ``BLOCK_TOK`` tokens for 2048
    elements (8 at ``BLOCK_D = 256``, 32 at 64: 64-72 registers, 44-50 % occupancy); then twice the
    tokens (fewer bin rows loaded twice by neighbouring tiles; 92-126 registers, 25-31 %); then, for
    ``D > 64``, ``BLOCK_D = 64`` with 32 tokens (more programs for few tokens ``B * T``)."""
    warps, most = arch_row(POOL_TABLE, arch)
    bd = _block_d(D)
    out = [TileConfig.of(warps, BLOCK_TOK=elems // bd, BLOCK_D=bd) for elems in BWD_TILE_ELEMS]
    if bd != BLOCK_D_CHOICES[0]:
        small = BLOCK_D_CHOICES[0]
        out.append(TileConfig.of(warps, BLOCK_TOK=BWD_TILE_ELEMS[0] // small, BLOCK_D=small))
    return tuple(out[:most])


# Autotuned on GPUs (key: D, L and the mask kind HAS_MASK; Triton adds the dtype; not B or T).
# Each program writes its output row once and reads no output: benchmarking on the real arguments
# is harmless (no reset_to_zero). The index kernel is not autotuned (one cheap launch, its BLOCK_T
# follows T).
_FORWARD = TunedKernel(_forward_kernel, key=["D", "L", "HAS_MASK"])
_BACKWARD = TunedKernel(_backward_kernel, key=["D", "L", "HAS_MASK"])


def _block_d(D: int) -> int:
    return BLOCK_D_CHOICES[0] if D <= BLOCK_D_CHOICES[0] else BLOCK_D_CHOICES[1]


def _block_t(T: int) -> int:
    return BLOCK_T_CHOICES[0] if T <= BLOCK_T_CHOICES[0] else BLOCK_T_CHOICES[1]


def _block_r(T: int, L: int) -> int:
    widest_bin = -(-T // L) + 1  # ceil(n / L) + 1 bounds every bin width for n <= T
    return BLOCK_R_CHOICES[0] if widest_bin <= BLOCK_R_CHOICES[0] else BLOCK_R_CHOICES[1]


def _kernel_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dtype not in MASK_DTYPES:
        attention_mask = attention_mask != 0
    return attention_mask


def _index(attention_mask: torch.Tensor, T: int, *, want_pos: bool):
    """n [B] int32 and pos or rank [B, T] int32 from the mask (one launch)."""
    mask = _kernel_mask(attention_mask)
    B = mask.shape[0]
    device = mask.device
    n = _alloc.empty((B,), dtype=torch.int32, device=device)
    table = _alloc.empty((B, T), dtype=torch.int32, device=device)
    _index_kernel[(B,)](
        mask,
        table,
        table,
        n,
        T,
        mask.stride(0),
        mask.stride(1),
        BLOCK_T=_block_t(T),
        WRITE_POS=want_pos,
        WRITE_RANK=not want_pos,
        num_warps=NUM_WARPS,
    )
    return n, table


def prompt_pool_forward(x: torch.Tensor, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """x: [B, T, D], attention_mask: [B, T] or None -> out: [B, length, D] (allocated here)."""
    B, T, D = x.shape
    out = _alloc.empty((B, length, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    has_mask = attention_mask is not None
    if has_mask:
        n, pos = _index(attention_mask, T, want_pos=True)
    else:
        n = pos = _alloc.empty((1,), dtype=torch.int32, device=x.device)  # unread: HAS_MASK=False
    _FORWARD.launch(
        lambda m: (B * length, triton.cdiv(D, m["BLOCK_D"])),
        forward_candidates(launch_arch(x.device), D, T, length),
        x, pos, n, out, T, D, length, x.stride(0), x.stride(1), x.stride(2),
        HAS_MASK=has_mask, device=x.device,
    )  # fmt: skip
    return out


def prompt_pool_backward(
    grad_out: torch.Tensor, attention_mask: torch.Tensor | None, seq_len: int
) -> torch.Tensor:
    """grad_out: [B, L, D] -> grad_x: [B, seq_len, D] (allocated here; zero rows for padding)."""
    B, L, D = grad_out.shape
    T = seq_len
    grad_x = _alloc.empty((B, T, D), dtype=grad_out.dtype, device=grad_out.device)
    if grad_x.numel() == 0:
        return grad_x
    if D * (max(BWD_TILE_ELEMS) // BLOCK_D_CHOICES[0]) >= 2**31:  # BLOCK_TOK * D: int32 offsets in a tile
        raise ValueError(f"prompt_pool backward: D = {D} is too large for the Triton kernel")
    has_mask = attention_mask is not None
    if has_mask:
        n, rank = _index(attention_mask, T, want_pos=False)
    else:
        n = rank = _alloc.empty((1,), dtype=torch.int32, device=grad_out.device)  # unread: HAS_MASK=False
    _BACKWARD.launch(
        lambda m: (B * triton.cdiv(T, m["BLOCK_TOK"]), triton.cdiv(D, m["BLOCK_D"])),
        backward_candidates(launch_arch(grad_out.device), D),
        grad_out, rank, n, grad_x, T, D, L, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        HAS_MASK=has_mask, device=grad_out.device,
    )  # fmt: skip
    return grad_x


# (D, T, L) covering every BLOCK_D / BLOCK_R rule
SHAPE_SWEEP = tuple((D, T, L) for D in (1, 64, 65, 768) for T in (1, 4, 24, 128, 4096) for L in (1, 5, 16))


def _tiles_by_arch(choose) -> dict[TileConfig, tuple[int, ...] | None]:
    archs: dict[TileConfig, set[int]] = {}
    for arch in TABLE_ARCHS:
        for D, T, L in SHAPE_SWEEP:
            for c in choose(arch, D, T, L):
                archs.setdefault(c, set()).add(arch)
    order = sorted(
        archs,
        key=lambda c: (
            c.kwargs.get("BLOCK_D", 0),
            c.kwargs.get("BLOCK_R", 0),
            c.kwargs.get("BLOCK_TOK", 0),
            c.num_warps,
        ),
    )
    return {c: None if archs[c] == set(TABLE_ARCHS) else tuple(sorted(archs[c])) for c in order}


def forward_table_tiles() -> dict[TileConfig, tuple[int, ...] | None]:
    """Every forward tile the launcher can offer on the checked architectures (None: all): the specs."""
    return _tiles_by_arch(lambda arch, D, T, L: forward_candidates(arch, D, T, L))


def backward_table_tiles() -> dict[TileConfig, tuple[int, ...] | None]:
    return _tiles_by_arch(lambda arch, D, T, L: backward_candidates(arch, D))


@register_compile_specs(OP)
def _compile_specs() -> list[CompileSpec]:
    specs = []
    for mname in _TL_MASK.values():
        for block_t in BLOCK_T_CHOICES:
            for want_pos in (True, False):
                specs.append(
                    CompileSpec(
                        name=f"prompt_pool_index[mask={mname},BLOCK_T={block_t},{'pos' if want_pos else 'rank'}]",
                        kernel=_index_kernel,
                        signature={
                            "mask_ptr": f"*{mname}",
                            "pos_ptr": "*i32",
                            "rank_ptr": "*i32",
                            "n_ptr": "*i32",
                            "T": "i32",
                            "stride_mb": "i32",
                            "stride_mt": "i32",
                            "BLOCK_T": "constexpr",
                            "WRITE_POS": "constexpr",
                            "WRITE_RANK": "constexpr",
                        },
                        constexprs={"BLOCK_T": block_t, "WRITE_POS": want_pos, "WRITE_RANK": not want_pos},
                        num_warps=NUM_WARPS,
                    )
                )
    for dt in DTYPES:
        t = _TL[dt]
        for has_mask in (True, False):
            for tile, archs in forward_table_tiles().items():
                block_r, block_d = tile.kwargs["BLOCK_R"], tile.kwargs["BLOCK_D"]
                specs.append(
                    CompileSpec(
                        name=f"prompt_pool_fwd[{t},mask={has_mask},BLOCK_R={block_r},BLOCK_D={block_d}]",
                        kernel=_forward_kernel,
                        signature={
                            "x_ptr": f"*{t}",
                            "pos_ptr": "*i32",
                            "n_ptr": "*i32",
                            "out_ptr": f"*{t}",
                            "T": "i32",
                            "D": "i32",
                            "L": "i32",
                            "stride_xb": "i32",
                            "stride_xt": "i32",
                            "stride_xd": "i32",
                            "HAS_MASK": "constexpr",
                            "BLOCK_R": "constexpr",
                            "BLOCK_D": "constexpr",
                        },
                        constexprs={"HAS_MASK": has_mask, **tile.kwargs},
                        num_warps=tile.num_warps,
                        num_stages=tile.num_stages,
                        archs=archs,
                    )
                )
            for tile, archs in backward_table_tiles().items():
                block_tok, block_d = tile.kwargs["BLOCK_TOK"], tile.kwargs["BLOCK_D"]
                specs.append(
                    CompileSpec(
                        name=f"prompt_pool_bwd[{t},mask={has_mask},BLOCK_TOK={block_tok},BLOCK_D={block_d}]",
                        kernel=_backward_kernel,
                        signature={
                            "grad_out_ptr": f"*{t}",
                            "rank_ptr": "*i32",
                            "n_ptr": "*i32",
                            "grad_x_ptr": f"*{t}",
                            "T": "i32",
                            "D": "i32",
                            "L": "i32",
                            "stride_gb": "i32",
                            "stride_gl": "i32",
                            "stride_gd": "i32",
                            "HAS_MASK": "constexpr",
                            "BLOCK_TOK": "constexpr",
                            "BLOCK_D": "constexpr",
                        },
                        constexprs={"HAS_MASK": has_mask, **tile.kwargs},
                        num_warps=tile.num_warps,
                        num_stages=tile.num_stages,
                        archs=archs,
                    )
                )
    return specs


@register_launch_cases(OP)
def _launch_cases() -> list[LaunchCase]:
    from prompt_kernels.floors import prompt_pool_floors

    B, T, D, L = 2, 24, 80, 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 17:] = False
    mask[1, :3] = False
    n_real = int(mask.sum()) // B  # 19 and 21 real tokens: the floors use the mean
    grad_out = torch.randn(B, L, D, generator=gen)
    floors = prompt_pool_floors(B, T, D, L, dtype=x.dtype, mask_dtype=mask.dtype, n_real=n_real)
    size = f"x[{B},{T},{D}]->{L} bool mask"
    return [
        LaunchCase(
            name=f"prompt_pool fwd fp32 {size}",
            op=OP,
            direction="forward",
            launch=lambda: prompt_pool_forward(x, mask, L),
            floor_bytes=floors["forward"]["bytes"],
            floor_flops=floors["forward"]["flops"],
            scale_note="bytes (B*T*D + B*L*D)*4 + B*T; flops D * sum of bin widths per row",
        ),
        LaunchCase(
            name=f"prompt_pool bwd fp32 {size}",
            op=OP,
            direction="backward",
            launch=lambda: prompt_pool_backward(grad_out, mask, T),
            floor_bytes=floors["backward"]["bytes"],
            floor_flops=floors["backward"]["flops"],
            scale_note="bytes (B*L*D + B*T*D)*4 + B*T; flops 2 * D * sum of bin widths per row",
        ),
    ]
