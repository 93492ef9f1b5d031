"""prompt_pool: every backend against the float64 reference (values and gradients), the reference
against ``torch.nn.AdaptiveAvgPool1d``, padding anywhere, empty rows, n < length, mask dtypes,
double backward, opcheck, torch.compile and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CAN_RUN_TRITON, INTERPRET, assert_within_budget, backends, device_for, require_cpp_build

from prompt_kernels import use_backend
from prompt_kernels.ops import prompt_pool
from prompt_kernels.ops.prompt_pool import bin_weights, prompt_pool_floors
from prompt_kernels.ops.reference import prompt_pool as reference

BACKENDS = backends(has_cpp=True)


def _dtypes_for(backend: str):
    # bf16 under the Triton interpreter goes through numpy's weak emulation; on a GPU it is tested.
    if backend == "triton" and INTERPRET:
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def make_mask(kind: str, B: int, T: int) -> torch.Tensor | None:
    """[B, T] bool: padding at the start / middle / end, random, none, or with an empty row."""
    if kind == "none":
        return None
    lengths = torch.randint(max(1, T // 3), T + 1, (B,))
    pos = torch.arange(T)[None, :]
    if kind == "end":
        mask = pos < lengths[:, None]
    elif kind == "start":
        mask = pos >= (T - lengths)[:, None]
    elif kind == "middle":
        gap0 = torch.randint(1, max(2, T // 2), (B,))
        mask = (pos < gap0[:, None]) | (pos >= (gap0 + T - lengths.clamp(max=T - 1))[:, None])
    elif kind in ("random", "empty"):
        mask = torch.rand(B, T) < 0.6
        if kind == "empty":
            mask[1] = False  # n = 0: zeros out, zero grads
    else:
        raise ValueError(kind)
    return mask


# (B, T, D, length, mask kind). Awkward sizes: D not a power of two, n < length, B = T = length = 1,
# T > 128 (the index kernel's long-sequence block, five backward token tiles of 32) with wide bins,
# D > 64 (the wide feature block), T not a multiple of the backward's 8-token tile at D > 64.
CASES = [
    (2, 11, 40, 4, "end"),
    (3, 9, 17, 3, "start"),
    (2, 13, 5, 5, "middle"),
    (3, 10, 33, 4, "random"),
    (2, 7, 9, 5, "none"),
    (2, 3, 6, 8, "random"),
    (1, 1, 3, 1, "none"),
    (3, 6, 7, 3, "empty"),
    (1, 130, 3, 3, "random"),
    (1, 5, 70, 2, "end"),
    (2, 37, 70, 3, "middle"),
    (3, 21, 66, 9, "empty"),
]


def _run(backend, x, mask, length, grad_out):
    device = device_for(backend)
    x = x.detach().to(device).requires_grad_()
    mask = None if mask is None else mask.to(device)
    with use_backend(backend):
        out = prompt_pool(x, mask, length)
        out.backward(grad_out.to(device))
    return out.detach().cpu(), x.grad.cpu()


def _reference(x, mask, length, grad_out):
    x = x.detach().clone().requires_grad_()
    out = reference(x, mask, length)
    out.backward(grad_out.to(x.dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_T{}_D{}_L{}_{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(backend, case, dtype):
    require_cpp_build(backend)
    if dtype not in _dtypes_for(backend):
        pytest.skip("bf16 runs through numpy's emulation under the Triton interpreter (tested on CUDA)")
    B, T, D, length, kind = case
    mask = make_mask(kind, B, T)
    x = torch.randn(B, T, D).to(dtype)
    grad_out = torch.randn(B, length, D).to(dtype)
    out, grad = _run(backend, x, mask, length, grad_out)
    ref64, grad64 = _reference(x.double(), mask, length, grad_out.double())
    ref_same, grad_same = _reference(x, mask, length, grad_out)
    assert out.dtype == dtype and out.shape == (B, length, D)
    assert_within_budget(out, ref64, ref_same, name=f"{backend} out")
    assert_within_budget(grad, grad64, grad_same, name=f"{backend} grad_x")
    if mask is not None:
        assert (grad[~mask] == 0).all(), "padding tokens must get exactly zero gradient"
        empty = ~mask.any(dim=1)
        assert (out[empty] == 0).all(), "rows without real tokens must pool to exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_benchmark_shape(backend):
    """The benchmark's shape (T = 128, D = 768, length = 16) with right padding, fp32."""
    require_cpp_build(backend)
    B, T, D, length = 1, 128, 768, 16
    mask = make_mask("end", B, T)
    x = torch.randn(B, T, D)
    grad_out = torch.randn(B, length, D)
    out, grad = _run(backend, x, mask, length, grad_out)
    ref64, grad64 = _reference(x.double(), mask, length, grad_out.double())
    ref_same, grad_same = _reference(x, mask, length, grad_out)
    assert_within_budget(out, ref64, ref_same, name=f"{backend} out")
    assert_within_budget(grad, grad64, grad_same, name=f"{backend} grad_x")


@pytest.mark.parametrize(
    "B,T,D,length", [(2, 12, 5, 4), (3, 7, 3, 7), (2, 5, 4, 9), (1, 1, 2, 3), (2, 16, 3, 5)]
)
def test_reference_is_adaptive_avg_pool(B, T, D, length):
    """Without padding the reference is nn.AdaptiveAvgPool1d over T; with padding anywhere, it is
    AdaptiveAvgPool1d over each row's real tokens taken in order."""
    x = torch.randn(B, T, D, dtype=torch.float64)
    pool = torch.nn.AdaptiveAvgPool1d(length)
    expected = pool(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(reference(x, None, length), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference(x, torch.ones(B, T, dtype=torch.bool), length), expected)
    for kind in ("start", "middle", "end", "random"):
        mask = make_mask(kind, B, T)
        out = reference(x, mask, length)
        for b in range(B):
            real = x[b, mask[b]]  # [n, D]
            if real.shape[0] == 0:
                torch.testing.assert_close(out[b], torch.zeros(length, D, dtype=x.dtype))
            else:
                row = F.adaptive_avg_pool1d(real.T[None], length)[0].T
                torch.testing.assert_close(out[b], row, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mask_dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str
)
def test_integer_masks(backend, mask_dtype):
    """Any nonzero value marks a real token; integer masks give the bool mask's result exactly."""
    require_cpp_build(backend)
    B, T, D, length = 3, 9, 5, 4
    mask = make_mask("random", B, T)
    values = torch.randint(1, 3, (B, T)) * (-1 if mask_dtype != torch.uint8 else 1)
    int_mask = torch.where(mask, values, 0).to(mask_dtype)
    x = torch.randn(B, T, D)
    grad_out = torch.randn(B, length, D)
    out_b, grad_b = _run(backend, x, mask, length, grad_out)
    out_i, grad_i = _run(backend, x, int_mask, length, grad_out)
    assert torch.equal(out_b, out_i) and torch.equal(grad_b, grad_i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_none_equals_all_real(backend):
    require_cpp_build(backend)
    x = torch.randn(2, 10, 6)
    grad_out = torch.randn(2, 3, 6)
    out_n, grad_n = _run(backend, x, None, 3, grad_out)
    out_m, grad_m = _run(backend, x, torch.ones(2, 10, dtype=torch.bool), 3, grad_out)
    torch.testing.assert_close(out_n, out_m, rtol=0, atol=0)
    torch.testing.assert_close(grad_n, grad_m, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    require_cpp_build(backend)
    device = device_for(backend)
    base = torch.randn(7, 2, 6)
    x = base.transpose(0, 1).to(device)  # [2, 7, 6], not contiguous
    mask_full = make_mask("random", 2, 14)
    mask = mask_full[:, ::2].to(device)  # [2, 7], not contiguous
    grad_out = torch.randn(3, 2, 6).transpose(0, 1).to(device)  # [2, 3, 6], not contiguous
    x.requires_grad_()
    with use_backend(backend):
        out = prompt_pool(x, mask, 3)
        out.backward(grad_out)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = reference(x64, mask.cpu(), 3)
    ref.backward(grad_out.cpu().double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_dimensions(backend):
    """T = 0 pools to zeros; B = 0 or D = 0 give empty outputs and gradients."""
    require_cpp_build(backend)
    for B, T, D in ((2, 0, 3), (0, 4, 3), (2, 4, 0)):
        x = torch.randn(B, T, D)
        mask = torch.ones(B, T, dtype=torch.bool)
        out, grad = _run(backend, x, mask, 3, torch.randn(B, 3, D))
        assert out.shape == (B, 3, D) and grad.shape == (B, T, D)
        assert (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend):
    """The backward is linear in grad_out with the forward as its adjoint: d<grad_x, v>/d grad_out = pool(v)."""
    require_cpp_build(backend)
    device = device_for(backend)
    B, T, D, length = 2, 8, 5, 3
    mask = make_mask("middle", B, T).to(device)
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    grad_out = torch.randn(B, length, D, device=device, requires_grad=True)
    v = torch.randn(B, T, D, device=device)
    with use_backend(backend):
        out = prompt_pool(x, mask, length)
        (grad_x,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
        (gg,) = torch.autograd.grad((grad_x * v).sum(), grad_out)
    expected = reference(v.cpu().double(), mask.cpu(), length)
    torch.testing.assert_close(gg.cpu().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "none"])
def test_opcheck(backend, kind):
    require_cpp_build(backend)
    device = device_for(backend)
    mask = make_mask(kind, 2, 6)
    mask = None if mask is None else mask.to(device)
    x = torch.randn(2, 6, 5, device=device, requires_grad=True)
    grad_out = torch.randn(2, 4, 5, device=device)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.prompt_kernels.prompt_pool.default, (x, mask, 4))
        torch.library.opcheck(torch.ops.prompt_kernels.prompt_pool_backward.default, (grad_out, mask, 6))


def test_torch_compile_fullgraph():
    """Default backend on CPU (C++ when built), compiled with fullgraph, matches eager in value and grad."""

    def fn(x, mask):
        return prompt_pool(x * 2, mask, 4).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for mask in (make_mask("random", 2, 9), None):
        x = torch.randn(2, 9, 6, requires_grad=True)
        expected = fn(x, mask)
        (g_expected,) = torch.autograd.grad(expected, x)
        got = compiled(x, mask)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(g_got, g_expected)


def test_torch_compile_inductor():
    def fn(x, mask):
        return torch.relu(prompt_pool(x, mask, 3)) + 1

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(2, 7, 5)
    mask = make_mask("start", 2, 7)
    torch.testing.assert_close(compiled(x, mask), fn(x, mask))


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 9, 6, device="meta")
    out = prompt_pool(x, torch.ones(2, 9, dtype=torch.bool, device="meta"), 4)
    assert out.shape == (2, 4, 6) and out.device.type == "meta"


def test_floors_count_memberships():
    """The flop floor counts every (token, bin) membership: the nonzeros of the bin-weight matrix."""
    B, T, D, length = 3, 37, 8, 6
    for n_real in (37, 20, 4):
        mask = torch.arange(T)[None, :].expand(B, T) < n_real
        nnz = int((bin_weights(mask, B, T, length, torch.float64, torch.device("cpu")) != 0).sum())
        floors = prompt_pool_floors(
            B, T, D, length, dtype=torch.float16, mask_dtype=torch.int64, n_real=n_real
        )
        assert floors["forward"]["flops"] == nnz * D
        assert floors["backward"]["flops"] == 2 * nnz * D
        assert floors["forward"]["bytes"] == B * T * D * 2 + B * T * 8 + B * length * D * 2
        assert floors["backward"]["bytes"] == B * length * D * 2 + B * T * 8 + B * T * D * 2


@pytest.mark.parametrize(
    "x,mask,length,error,match",
    [
        (torch.randn(4, 6), None, 2, ValueError, "x must have 3 dimensions"),
        (torch.randn(1, 4, 6, 2), None, 2, ValueError, "x must have 3 dimensions"),
        ([[[1.0]]], None, 1, TypeError, "x must be a torch.Tensor"),
        (torch.randn(2, 4, 6, dtype=torch.float64), None, 2, TypeError, "x must have dtype"),
        (torch.ones(2, 4, 6, dtype=torch.int32), None, 2, TypeError, "x must have dtype"),
        (
            torch.randn(2, 4, 6),
            torch.ones(2, 5, dtype=torch.bool),
            2,
            ValueError,
            r"attention_mask must have shape \[B=2, T=4\]",
        ),
        (
            torch.randn(2, 4, 6),
            torch.ones(2, 4, 1, dtype=torch.bool),
            2,
            ValueError,
            "attention_mask must have shape",
        ),
        (
            torch.randn(2, 4, 6),
            torch.ones(8, dtype=torch.bool),
            2,
            ValueError,
            "attention_mask must have shape",
        ),
        (
            torch.randn(2, 4, 6),
            torch.ones(2, 4),
            2,
            TypeError,
            "attention_mask must have dtype bool or an integer",
        ),
        (
            torch.randn(2, 4, 6),
            torch.ones(2, 4, dtype=torch.float16),
            2,
            TypeError,
            "attention_mask must have dtype",
        ),
        (torch.randn(2, 4, 6), [[1, 1, 1, 1]] * 2, 2, TypeError, "attention_mask must be a torch.Tensor"),
        (torch.randn(2, 4, 6), None, 0, ValueError, "length must be >= 1"),
        (torch.randn(2, 4, 6), None, -3, ValueError, "length must be >= 1"),
        (torch.randn(2, 4, 6), None, 2.0, TypeError, "length must be an int"),
        (torch.randn(2, 4, 6), None, True, TypeError, "length must be an int"),
        (torch.randn(2, 4, 6), None, "2", TypeError, "length must be an int"),
        (
            torch.randn(2, 4, 6),
            torch.ones(2, 4, dtype=torch.bool, device="meta"),
            2,
            ValueError,
            "same device",
        ),
        (
            torch.empty(2, 4, 6, device="meta"),
            torch.ones(2, 4, dtype=torch.bool),
            2,
            ValueError,
            "same device",
        ),
    ],
)
def test_bad_inputs(x, mask, length, error, match):
    with pytest.raises(error, match=match):
        prompt_pool(x, mask, length)
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return  # the reference takes float64: it is the ground truth
    with pytest.raises(error, match=match):
        reference(x, mask, length)


@pytest.mark.skipif(not INTERPRET, reason="the fixed tile is the interpreter's (a GPU autotunes)")
def test_interpreter_launches_the_fixed_tile(monkeypatch):
    """Forward and backward use the first candidate of the default row under the interpreter."""
    from prompt_kernels.kernels import prompt_pool as k

    used = []
    for tuned in (k._FORWARD, k._BACKWARD):
        monkeypatch.setattr(tuned, "launch", lambda *a, _o=tuned.launch, **kw: used.append(_o(*a, **kw)))
    B, T, D, L = 2, 24, 80, 5
    x = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 17:] = False
    out = k.prompt_pool_forward(x, mask, L)
    k.prompt_pool_backward(torch.ones_like(out), mask, T)
    assert used == [k.forward_candidates(0, D, T, L)[0], k.backward_candidates(0, D)[0]]
    assert used[0].kwargs == {"BLOCK_R": 8, "BLOCK_D": 256}
    assert used[1].kwargs == {"BLOCK_TOK": 8, "BLOCK_D": 256}
    assert not k._FORWARD.tuners and not k._BACKWARD.tuners
    torch.testing.assert_close(out, reference(x, mask, L))


def _bin_rows_per_tile(mask: torch.Tensor | None, B: int, T: int, length: int, tok: int) -> int:
    """grad_out rows the backward loads: per tile of ``tok`` tokens, the bins of its real tokens."""
    rows = 0
    for b in range(B):
        real = torch.ones(T, dtype=torch.bool) if mask is None else mask[b]
        n = int(real.sum())
        rank = torch.where(real, real.long().cumsum(0) - 1, -1)
        for t0 in range(0, T, tok):
            r = rank[t0 : t0 + tok]
            r = r[r >= 0]
            if r.numel():
                rows += min(-(-(int(r.max()) + 1) * length // n), length) - int(r.min()) * length // n
    return rows


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
@pytest.mark.parametrize("kind", ["end", "random", "empty", "none"])
def test_backward_reads_grad_out_about_once(kind):
    """The backward kernel loads each grad_out row once per token tile holding one of its tokens (a bin
    straddling two tiles twice), not once per token: grad_out issued <= (B L + B (tiles - 1)) rows,
    exactly the rows of the tiles' bins; the ranks once, n once per program, grad_x stored once.
    Fails on the former program per token (grad_out issued about T / L times)."""
    from prompt_kernels.kernels import prompt_pool as k
    from prompt_kernels.tools.traffic import TrafficMeter

    B, T, D, length = 3, 70, 80, 6  # D > 64: 8-token tiles, 9 a row, the last one partial
    mask = make_mask(kind, B, T)
    if mask is not None:
        mask[0] = False
        mask[0, 20:23] = True  # n = 3 < length: every token in two bins
    grad_out = torch.randn(B, length, D)
    with TrafficMeter() as meter:
        grad = k.prompt_pool_backward(grad_out, mask, T)
    bwd = meter.launches[-1]
    assert (
        [r.kernel for r in meter.launches] == ["_backward_kernel"]
        if mask is None
        else [
            "_index_kernel",
            "_backward_kernel",
        ]
    )
    tok = k.backward_candidates(0, D)[0].kwargs["BLOCK_TOK"]
    tiles = -(-T // tok)
    assert bwd.grid == (B * tiles, 1, 1)
    rows = _bin_rows_per_tile(mask, B, T, length, tok)
    assert rows <= B * length + B * (tiles - 1)
    index_bytes = 0 if mask is None else B * tiles * 4 + B * T * 4  # n per program, the ranks
    assert bwd.loaded_bytes == rows * D * 4 + index_bytes
    assert bwd.stored_bytes == bwd.unique_stored_bytes == B * T * D * 4
    x = torch.zeros(B, T, D, dtype=torch.float64)
    _, grad64 = _reference(x, mask, length, grad_out.double())
    _, grad_same = _reference(x.float(), mask, length, grad_out)
    assert_within_budget(grad, grad64, grad_same, name="grad_x")


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
def test_launch_cases_within_one_and_a_half_of_the_byte_floor():
    """Issue #15's goal at the registered launch cases: issued bytes (no cache) at most 1.5x the floor."""
    from prompt_kernels.kernels import registry
    from prompt_kernels.tools.traffic import TrafficMeter

    cases = [c for c in registry.launch_cases() if c.op == "prompt_pool"]
    assert len(cases) == 2
    for case in cases:
        with TrafficMeter() as meter:
            case.launch()
        assert meter.totals.issued_bytes <= 1.5 * case.floor_bytes, (case.name, meter.totals.issued_bytes)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_backward_tile(monkeypatch, dtype):
    """Every backward tile a GPU may pick, each the only candidate (so launched as is, also where a
    GPU would autotune), at T not a multiple of the token tile (two full tiles and a partial one), D
    not a multiple of BLOCK_D (two feature programs at BLOCK_D = 64), n < length in one row and no real
    token in another."""
    from prompt_kernels.kernels import prompt_pool as k

    dev = device_for("triton")

    tiles = k.backward_table_tiles()
    assert {c.kwargs["BLOCK_D"] for c in tiles} == set(k.BLOCK_D_CHOICES)
    assert {c.kwargs["BLOCK_TOK"] * c.kwargs["BLOCK_D"] for c in tiles} == set(k.BWD_TILE_ELEMS)
    for tile in tiles:
        monkeypatch.setattr(k, "backward_candidates", lambda arch, D, _t=tile: (_t,))
        tok = tile.kwargs["BLOCK_TOK"]
        B, T, D, length = 3, 2 * tok + 3, 70, 5
        mask = make_mask("middle", B, T)
        mask[1] = False
        mask[2] = False
        mask[2, T - 3 :] = True  # n = 3 < length, the real tokens in the partial tile
        grad_out = torch.randn(B, length, D).to(dtype)
        grad = k.prompt_pool_backward(grad_out.to(dev), mask.to(dev), T).cpu()
        x = torch.zeros(B, T, D, dtype=dtype)
        _, grad64 = _reference(x.double(), mask, length, grad_out.double())
        _, grad_same = _reference(x, mask, length, grad_out)
        assert_within_budget(grad, grad64, grad_same, name=f"grad_x {tile}")
        assert (grad[~mask] == 0).all(), f"{tile}: padding tokens must get exactly zero gradient"
        grad_n = k.prompt_pool_backward(grad_out.to(dev), None, T).cpu()
        _, grad64 = _reference(x.double(), None, length, grad_out.double())
        _, grad_same = _reference(x, None, length, grad_out)
        assert_within_budget(grad_n, grad64, grad_same, name=f"grad_x {tile} no mask")
