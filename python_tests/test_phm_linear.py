"""phm_linear: every backend against the float64 reference (output and the gradients of x, rules,
weights and bias), awkward shapes, partial gradients, strided inputs, empty batches, the reference
against the Kronecker definition, opcheck, torch.compile and bad inputs."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import INTERPRET, assert_within_budget, backends, device_for, require_cpp_build

from prompt_kernels import use_backend
from prompt_kernels.ops import phm_linear
from prompt_kernels.ops.phm_linear import _phm_linear_backward_op, _phm_linear_op, phm_linear_floors
from prompt_kernels.ops.reference import phm_linear as reference

phm_module = importlib.import_module("prompt_kernels.ops.phm_linear")

BACKENDS = backends(has_cpp=True)
NAMES = ("x", "rules", "weights", "bias")


def _dtypes_for(backend: str):
    # bf16 under the Triton interpreter goes through numpy's weak emulation; on a GPU it is tested.
    if backend == "triton" and INTERPRET:
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def make_inputs(x_shape, out_features, n, bias=True, dtype=torch.float32):
    in_features = x_shape[-1]
    x = torch.randn(*x_shape)
    rules = torch.randn(n, n, n)
    weights = torch.randn(n, in_features // n, out_features // n) / (in_features**0.5)
    b = torch.randn(out_features) if bias else None
    return [t if t is None else t.to(dtype) for t in (x, rules, weights, b)]


def _run(backend, inputs, grad_out, requires=(True, True, True, True)):
    device = device_for(backend)
    leaves = [
        None if t is None else t.detach().to(device).requires_grad_(r) for t, r in zip(inputs, requires)
    ]
    with use_backend(backend):
        y = phm_linear(*leaves)
        y.backward(grad_out.to(device))
    grads = [None if t is None or not t.requires_grad else t.grad.cpu() for t in leaves]
    return y.detach().cpu(), grads


def _reference(inputs, grad_out, dtype=None):
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in inputs]
    y = reference(*leaves)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _assert_all_within_budget(backend, inputs, grad_out, y, grads):
    """y and every gradient against float64, each with the ulps of its sums of absolute terms: phm_linear
    is multilinear, so the float64 reference run on |inputs| and |grad_out| gives exactly those sums
    (grad_rules, for one, sums W * x * dy over the batch and the features and may cancel to little)."""
    y64, grads64 = _reference(inputs, grad_out, torch.float64)
    y_same, grads_same = _reference(inputs, grad_out)
    absolute = [None if t is None else t.abs() for t in inputs]
    y_abs, grads_abs = _reference(absolute, grad_out.abs(), torch.float64)
    assert_within_budget(y, y64, y_same, name=f"{backend} y", term_scale=y_abs.max().item())
    for name, g, g64, g_same, g_abs in zip(NAMES, grads, grads64, grads_same, grads_abs):
        if g64 is None:
            assert g is None
            continue
        scale = g_abs.max().item() if g_abs.numel() else 0.0
        assert_within_budget(g, g64, g_same, name=f"{backend} grad_{name}", term_scale=scale)


# (x shape, out_features, n, bias). Awkward: batch 1 with I = 3, O = 2; 3-D x with I and O not
# multiples of any block; n = 1 (a plain linear layer) without bias; N = 70 (several row splits of
# the weight gradient and a partial row tile); a length-1 middle dimension; n = 3 (not a power of two).
CASES = [
    ((1, 12), 8, 4, True),
    ((3, 5, 36), 20, 2, True),
    ((7, 10), 6, 1, False),
    ((70, 40), 24, 4, True),
    ((2, 1, 96), 48, 4, False),
    ((5, 15), 9, 3, True),
    ((9, 64), 32, 4, True),  # I = 16, O = 8: fp16 takes the aligned launch (ALIGN = 8, 2 stages)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x{}_out{}_n{}_bias{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(backend, case, dtype):
    require_cpp_build(backend)
    if dtype not in _dtypes_for(backend):
        pytest.skip("bf16 runs through numpy's emulation under the Triton interpreter (tested on CUDA)")
    x_shape, out_features, n, bias = case
    inputs = make_inputs(x_shape, out_features, n, bias, dtype)
    grad_out = torch.randn(*x_shape[:-1], out_features).to(dtype)
    y, grads = _run(backend, inputs, grad_out)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], out_features)
    _assert_all_within_budget(backend, inputs, grad_out, y, grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_benchmark_like_shape(backend):
    """The benchmark's layer (384 -> 64, n = 4), fp32; fewer rows for the interpreter."""
    require_cpp_build(backend)
    rows = 40 if backend == "triton" and INTERPRET else 2048
    inputs = make_inputs((rows, 384), 64, 4)
    grad_out = torch.randn(rows, 64)
    y, grads = _run(backend, inputs, grad_out)
    _assert_all_within_budget(backend, inputs, grad_out, y, grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "requires",
    [
        (True, False, False, False),
        (False, True, True, False),
        (False, False, False, True),
        (False, True, False, True),
    ],
    ids=lambda r: "".join("xrwb"[i] for i, v in enumerate(r) if v),
)
def test_partial_gradients(backend, requires):
    """Only the gradients asked for are computed, and they equal the full backward's."""
    require_cpp_build(backend)
    inputs = make_inputs((9, 24), 12, 2)
    grad_out = torch.randn(9, 12)
    _, full = _run(backend, inputs, grad_out)
    _, part = _run(backend, inputs, grad_out, requires)
    for name, want, g, f in zip(NAMES, requires, part, full):
        if want:
            torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6, msg=f"grad_{name}")
        else:
            assert g is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """A transposed x, non-contiguous weights and a non-contiguous grad_out give the same results."""
    require_cpp_build(backend)
    device = device_for(backend)
    x = torch.randn(20, 7).t().to(device).requires_grad_()  # [7, 20], column-major
    rules = torch.randn(2, 2, 2).transpose(1, 2).to(device).requires_grad_()
    weights = torch.randn(2, 6, 10).transpose(1, 2).to(device).requires_grad_()  # [2, 10, 6]
    bias = torch.randn(24)[::2].to(device).requires_grad_()
    grad_out = torch.randn(12, 7).t().to(device)
    with use_backend(backend):
        y = phm_linear(x, rules, weights, bias)
        y.backward(grad_out)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, rules, weights, bias)]
    y64 = reference(*leaves)
    y64.backward(grad_out.cpu().double())
    torch.testing.assert_close(y.detach().cpu().double(), y64, rtol=1e-5, atol=1e-5)
    for name, t, t64 in zip(NAMES, (x, rules, weights, bias), leaves):
        torch.testing.assert_close(t.grad.cpu().double(), t64.grad, rtol=1e-5, atol=1e-5, msg=f"grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """No rows: an empty output, zero parameter gradients, the bias gradient zero."""
    require_cpp_build(backend)
    inputs = make_inputs((0, 3, 8), 12, 4)
    y, grads = _run(backend, inputs, torch.randn(0, 3, 12))
    assert y.shape == (0, 3, 12)
    assert grads[0].shape == (0, 3, 8)
    for g, t in zip(grads[1:], inputs[1:]):
        assert g.shape == t.shape and (g == 0).all()


def test_reference_is_the_kronecker_sum():
    """H[a*I + p, b*O + q] = sum_i rules[i, a, b] * weights[i, p, q], checked element by element,
    and the reference equals the compacter formula x @ sum_i kron(A_i, B_i) + bias."""
    n, ib, ob = 3, 2, 4
    x, rules, weights, bias = (t.double() for t in make_inputs((5, n * ib), n * ob, n))
    H = torch.zeros(n * ib, n * ob, dtype=torch.float64)
    for a in range(n):
        for p in range(ib):
            for b in range(n):
                for q in range(ob):
                    H[a * ib + p, b * ob + q] = sum(rules[i, a, b] * weights[i, p, q] for i in range(n))
    torch.testing.assert_close(reference(x, rules, weights, bias), x @ H + bias, rtol=1e-12, atol=1e-12)
    kron = sum(torch.kron(rules[i], weights[i]) for i in range(n))
    torch.testing.assert_close(kron, H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference(x, rules, weights), x @ H, rtol=1e-12, atol=1e-12)


def test_floors():
    fl = phm_linear_floors(2048, 384, 64, 4, 4, bias=True)
    params = 4**3 + 4 * 96 * 16 + 64
    assert fl.forward_bytes == 4 * (2048 * 384 + params + 2048 * 64)
    assert fl.forward_flops == 2 * 2048 * 384 * 64 + 2048 * 64
    assert fl.backward_flops == 4 * 2048 * 384 * 64 + 4 * 4 * 384 * 64 + 2048 * 64
    assert fl.kron_build_flops == 2 * 4 * 384 * 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require_cpp_build(backend)
    device = device_for(backend)
    x, rules, weights, bias = (t.to(device) for t in make_inputs((2, 3, 8), 12, 2))
    grad_out = torch.randn(2, 3, 12, device=device)
    with use_backend(backend):
        for b in (bias, None):
            args = (x.requires_grad_(), rules.requires_grad_(), weights.requires_grad_(), b)
            torch.library.opcheck(_phm_linear_op, args)
        for flags in ((True, True, True), (False, True, False), (True, False, False)):
            torch.library.opcheck(
                _phm_linear_backward_op, (grad_out, x.detach(), rules.detach(), weights.detach(), *flags)
            )


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_torch_compile_fullgraph(backend):
    require_cpp_build(backend)
    inputs = make_inputs((4, 5, 16), 8, 4)
    grad_out = torch.randn(4, 5, 8)
    leaves = [t.clone().requires_grad_() for t in inputs]

    def step(x, rules, weights, bias):
        return phm_linear(x, rules, weights, bias).sin()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        y = compiled(*leaves)
        y.backward(grad_out)
    # Compiled must equal eager (same backend, same ops); accuracy against float64 is the job of
    # test_matches_reference, whose budget accounts for cancelling sums.
    eager = [t.clone().requires_grad_() for t in inputs]
    with use_backend(backend):
        y_eager = step(*eager)
        y_eager.backward(grad_out)
    torch.testing.assert_close(y, y_eager)
    for name, t, t_eager in zip(NAMES, leaves, eager):
        torch.testing.assert_close(t.grad, t_eager.grad, msg=f"grad_{name}")


def test_torch_compile_inductor_forward():
    """The default inductor backend traces the op as one node (forward, cpp backend when built)."""
    x, rules, weights, bias = make_inputs((6, 16), 8, 4)
    compiled = torch.compile(phm_linear, fullgraph=True)
    torch.testing.assert_close(compiled(x, rules, weights, bias), reference(x, rules, weights, bias))


def _bad(x=None, rules=None, weights=None, bias="default"):
    gx, gr, gw, gb = make_inputs((3, 8), 12, 2)
    return (gx if x is None else x, gr if rules is None else rules, gw if weights is None else weights,
            gb if isinstance(bias, str) else bias)  # fmt: skip


BAD = [
    ("x not a tensor", _bad(x=[[1.0] * 8] * 3), TypeError, "x must be a torch.Tensor"),
    ("rules not a tensor", _bad(rules=1.0), TypeError, "rules must be a torch.Tensor"),
    ("bias not a tensor", _bad(bias=[0.0] * 12), TypeError, "bias must be a torch.Tensor"),
    ("x 0-d", _bad(x=torch.tensor(1.0)), ValueError, "x must have at least 1"),
    ("rules 2-d", _bad(rules=torch.randn(2, 2)), ValueError, "rules must have 3 dimensions"),
    ("weights 2-d", _bad(weights=torch.randn(4, 6)), ValueError, "weights must have 3 dimensions"),
    ("bias 2-d", _bad(bias=torch.randn(1, 12)), ValueError, "bias must have 1 dimensions"),
    ("rules not cubic", _bad(rules=torch.randn(2, 2, 3)), ValueError, "rules must have shape [n, n, n]"),
    ("rules n = 0", _bad(rules=torch.randn(0, 0, 0)), ValueError, "rules must have shape [n, n, n]"),
    ("n mismatch", _bad(weights=torch.randn(4, 2, 3)), ValueError, "(n from rules)"),
    ("n does not divide in", _bad(x=torch.randn(3, 9)), ValueError, "must be divisible by n=2"),
    ("weights wrong I", _bad(weights=torch.randn(2, 3, 6)), ValueError, "in_features // n=4"),
    ("bias wrong size", _bad(bias=torch.randn(10)), ValueError, "bias must have shape [out_features=12]"),
    ("integer x", _bad(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, "x must have dtype in"),
    ("float64 x", _bad(x=torch.randn(3, 8, dtype=torch.float64)), TypeError, "x must have dtype in"),
    ("mixed dtypes", _bad(weights=torch.randn(2, 4, 6, dtype=torch.float16)), TypeError, "weights must have the same dtype as x"),
    ("mixed bias dtype", _bad(bias=torch.randn(12, dtype=torch.bfloat16)), TypeError, "bias must have the same dtype as x"),
    ("wrong device", _bad(rules=torch.randn(2, 2, 2, device="meta")), ValueError, "rules must be on the same device as x"),
    ("wrong bias device", _bad(bias=torch.randn(12, device="meta")), ValueError, "bias must be on the same device as x"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(case):
    _, args, exc, msg = case
    with pytest.raises(exc) as info:
        phm_linear(*args)
    assert msg in str(info.value)


def test_reference_accepts_float64():
    x, rules, weights, bias = (t.double() for t in make_inputs((3, 8), 12, 2))
    assert reference(x, rules, weights, bias).dtype == torch.float64
    with pytest.raises(TypeError, match="x must have dtype in"):
        phm_linear(x, rules, weights, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_call_does_not_reuse_outputs(backend):
    """Two calls give fresh outputs (the result of the first is not overwritten by the second)."""
    require_cpp_build(backend)
    device = device_for(backend)
    a = [t.to(device) for t in make_inputs((4, 8), 4, 2)]
    b = [t.to(device) for t in make_inputs((4, 8), 4, 2)]
    with use_backend(backend):
        ya = phm_linear(*a)
        ya_copy = ya.clone()
        phm_linear(*b)
    assert torch.equal(ya, ya_copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_skips_the_custom_op_with_identical_results(backend, monkeypatch):
    """Eager calls run the custom ops' implementations through an autograd.Function (no dispatch
    cost); the values and gradients are bit-identical to the custom op's."""
    dev = device_for(backend)
    inputs = [t.to(dev) for t in make_inputs((5, 7, 12), 8, 4)]
    grad_out = torch.randn(5, 7, 8, device=dev)
    results = []
    with use_backend(backend):
        for fn in (_phm_linear_op, phm_linear):
            leaves = [t.detach().requires_grad_() for t in inputs]
            y = fn(*leaves)
            results.append([y, *torch.autograd.grad(y, leaves, grad_out)])
        monkeypatch.setattr(phm_module, "_phm_linear_op", None)  # the eager path must not touch it
        monkeypatch.setattr(phm_module, "_phm_linear_backward_op", None)
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = phm_linear(*leaves)
        torch.autograd.grad(y, leaves, grad_out)
    for ours, op in zip(*results):
        torch.testing.assert_close(ours, op, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The Triton weight gradient: dH = x^T dy on tiles of every Kronecker block at once, contracted with
# rules / weights in registers (one split: dweights and dbias stored in place; several: per-split fp32
# partials summed in order by _grad_reduce_kernel; no atomics). Launched directly, with NaN-filled
# outputs (the launcher's own workspaces are NaN-poisoned by conftest's PROMPT_KERNELS_POISON=1).

# (x shape, out_features, n): batch 1; in/out not multiples of any tile (I = 5, O = 7; I = 9, O = 5);
# 3-D x; I = 68 (several dH p-tiles); O = 20 with n = 4 (several q-tiles); I = O = 16 (fp16: the
# aligned launch, ALIGN = 8 and 2 stages).
GRAD_CASES = [
    ((1, 12), 8, 4),
    ((1, 10), 14, 2),
    ((3, 7, 36), 20, 4),
    ((75, 136), 36, 2),
    ((5, 12), 80, 4),
    ((33, 64), 64, 4),
]


def _launch_backward(inputs, grad_out, splits):
    """Every gradient from ``phm_linear_backward`` into NaN-filled buffers, on the Triton device."""
    from prompt_kernels.kernels import phm_linear as kernels

    dev = device_for("triton")
    x, rules, weights = (t.to(dev) for t in inputs[:3])
    x2, dy2 = x.reshape(-1, x.shape[-1]), grad_out.to(dev).reshape(-1, grad_out.shape[-1])
    nan = float("nan")
    dx = torch.full(x2.shape, nan, dtype=x.dtype, device=dev)
    dr, dw = torch.full_like(rules, nan), torch.full_like(weights, nan)
    db = torch.full((dy2.shape[1],), nan, dtype=x.dtype, device=dev)
    kernels.phm_linear_backward(dy2, x2, rules, weights, dx, dr, dw, db, splits=splits)
    return [g.cpu() for g in (dx.view(x.shape), dr, dw, db)]


@pytest.mark.parametrize("splits", [None, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "x{}_out{}_n{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_weight_gradient_matches_float64(case, dtype, splits):
    """drules, dweights (and dx, dbias) of the Triton launcher against float64, one or several row
    splits of the dH GEMM."""
    x_shape, out_features, n = case
    inputs = make_inputs(x_shape, out_features, n, True, dtype)
    grad_out = torch.randn(*x_shape[:-1], out_features).to(dtype)
    grads = _launch_backward(inputs, grad_out, splits)
    y = reference(*inputs) if dtype == torch.float32 else reference(*(t.float() for t in inputs)).to(dtype)
    _assert_all_within_budget("triton", inputs, grad_out, y, grads)


@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("want", ["r", "w", "b", "rb", "wb"])
def test_triton_partial_parameter_gradients(want, splits):
    """Each subset of drules / dweights / dbias alone, one or several splits (partials of the ones
    asked for only; dweights still contracted for drules alone), equals the full launch's values."""
    from prompt_kernels.kernels import phm_linear as kernels

    x, rules, weights, _ = make_inputs((70, 40), 24, 4)
    dy = torch.randn(70, 24)
    full = _launch_backward([x, rules, weights], dy, splits)
    nan = float("nan")
    dr, dw, db = torch.full_like(rules, nan), torch.full_like(weights, nan), torch.full((24,), nan)
    kernels.phm_linear_backward(
        dy, x, rules, weights, None, dr if "r" in want else None, dw if "w" in want else None,
        db if "b" in want else None, splits=splits,
    )  # fmt: skip
    for key, got, ref in (("r", dr, full[1]), ("w", dw, full[2]), ("b", db, full[3])):
        if key in want:
            assert torch.equal(got, ref), key
        else:
            assert torch.isnan(got).all(), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_out", [12, 16])
def test_triton_weight_gradient_alignment_and_stages(monkeypatch, dtype, q_out):
    """``_grad_h_kernel`` gets ``ALIGN = 8`` and 2 stages for fp16 with I, O multiples of 8 (O = 16),
    ``ALIGN = 1`` and 1 stage when O = 12 (2-byte loads: no cp.async); fp32 always 1 and 2 stages;
    the values are right either way."""
    from prompt_kernels.kernels import phm_linear as k

    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["ALIGN"], kwargs["num_stages"], kwargs["N_POW2"]))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(k, "_grad_h_kernel", Spy(k._grad_h_kernel))
    inputs = make_inputs((9, 3 * 16), 3 * q_out, 3, True, dtype)
    grad_out = torch.randn(9, 3 * q_out).to(dtype)
    grads = _launch_backward(inputs, grad_out, None)
    aligned = dtype == torch.float16 and q_out % 8 == 0
    assert seen == [(8 if aligned else 1, 1 if dtype == torch.float16 and not aligned else 2, 4)]
    y = reference(*inputs) if dtype == torch.float32 else reference(*(t.float() for t in inputs)).to(dtype)
    _assert_all_within_budget("triton", inputs, grad_out, y, grads)


def test_triton_weight_gradient_bitwise_deterministic():
    """Two runs give bit-identical parameter gradients (several splits, several tiles)."""
    inputs = make_inputs((70, 40), 24, 4)
    grad_out = torch.randn(70, 24)
    first = _launch_backward(inputs, grad_out, 3)
    second = _launch_backward(inputs, grad_out, 3)
    for name, a, b in zip(NAMES, first, second):
        assert not torch.isnan(a).any(), name
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"grad_{name} differs between runs"
    # the op end to end as well
    runs = [_run("triton", inputs, grad_out)[1] for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"op grad_{name} differs between runs"


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
def test_triton_weight_gradient_has_no_atomics_and_single_writes():
    """The backward launches the deterministic kernels: no atomics, and no byte stored twice in one
    launch (so no result depends on the order in which programs run). Fails on the former atomic
    split-K kernel."""
    from prompt_kernels.tools.traffic import TrafficMeter

    inputs = make_inputs((70, 40), 24, 4)
    grad_out = torch.randn(70, 24)
    with TrafficMeter() as meter:
        _launch_backward(inputs, grad_out, 3)
    kernels = [rec.kernel for rec in meter.launches]
    assert kernels == ["_grad_x_kernel", "_grad_h_kernel", "_grad_reduce_kernel"]
    grad_h, reduce = meter.launches[1:]
    assert grad_h.grid[2] == 3 and grad_h.dot_flops >= 2 * 70 * 40 * 24  # the split-K GEMM, 3 splits
    # drules, then the partials of dweights (4 * 10 * 6 elements) and dbias (24), 1024 a program
    assert reduce.grid == (3, 1, 1)
    for rec in meter.launches:
        assert rec.atomics == 0, rec.kernel
        assert rec.stored_bytes == rec.unique_stored_bytes, f"{rec.kernel} stores some bytes twice"


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_weight_gradient_one_split_has_no_workspace_round_trip(dtype):
    """One split (the interpreter's choice at a small batch): ``_grad_h_kernel`` contracts ``dH`` in
    registers and stores dweights and dbias in place, once, plus the tiles' drules shares; the
    reduction only sums those shares. x and dy are read once per dH column / row tile, weights and
    rules once per program; nothing else is read."""
    from prompt_kernels.kernels import phm_linear as k
    from prompt_kernels.tools.traffic import TrafficMeter

    N, n, p_in, q_out = 21, 3, 5, 7
    inputs = make_inputs((N, n * p_in), n * q_out, n, True, dtype)
    grad_out = torch.randn(N, n * q_out).to(dtype)
    with TrafficMeter() as meter:
        grads = _launch_backward(inputs, grad_out, None)
    assert [rec.kernel for rec in meter.launches] == [
        "_grad_x_kernel",
        "_grad_h_kernel",
        "_grad_reduce_kernel",
    ]
    grad_h, reduce = meter.launches[1:]
    assert grad_h.grid == (1, 1, 1) and reduce.grid == (1, 1, 1)  # every block in one tile, one split
    e = inputs[0].element_size()
    x, rules, w = inputs[:3]
    assert (
        grad_h.loaded_bytes
        == grad_h.unique_loaded_bytes
        == (x.numel() + grad_out.numel() + w.numel()) * e + (rules.numel() * e)
    )
    assert grad_h.stored_bytes == (w.numel() + n * q_out) * e + 4 * n**3  # dw, db in place, drules share
    assert reduce.loaded_bytes == 4 * n**3 and reduce.stored_bytes == n**3 * e
    assert k.grad_h_splits(N, n * p_in, n * q_out, 1, e, x.device, None, w.numel() + n * q_out)[0] == 1
    y = reference(*inputs) if dtype == torch.float32 else reference(*(t.float() for t in inputs)).to(dtype)
    _assert_all_within_budget("triton", inputs, grad_out, y, grads)


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
def test_launch_cases_within_one_and_a_half_of_the_byte_floor():
    """Issue #15's goal at the registered launch cases: issued bytes (no cache) at most 1.5x the
    floor, forward and backward, with tl.dot doing the products."""
    from prompt_kernels.kernels import registry
    from prompt_kernels.tools.traffic import TrafficMeter

    cases = [c for c in registry.launch_cases() if c.op == "phm_linear"]
    assert len(cases) == 4
    for case in cases:
        with TrafficMeter() as meter:
            case.launch()
        assert meter.totals.issued_bytes <= 1.5 * case.floor_bytes, (case.name, meter.totals.issued_bytes)
        assert meter.totals.dot_flops >= case.floor_flops * 0.9, case.name


@pytest.mark.skipif(not INTERPRET, reason="the fixed tile is the interpreter's (a GPU autotunes)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_out", [12, 16])
def test_interpreter_launches_the_fixed_tile(monkeypatch, dtype, q_out):
    """Under the interpreter the forward and grad_x launchers use the first candidate of the default
    row (``mm_candidates(0, ...)``) with every block in one tile (``N_UNROLL = next_pow2(n)``), the
    ``ALIGN`` / ``num_stages`` of ``mm_align`` (fp16 with O = 12: 1 and 1 stage; O = 16: 8 and 2),
    build no autotuner, and compute the right values."""
    from prompt_kernels.kernels import phm_linear as k

    used, kwargs = [], []

    def spy(orig):
        def launch(*a, **kw):
            kwargs.append({key: kw[key] for key in ("N_UNROLL", "ALIGN")})
            used.append(orig(*a, **kw))

        return launch

    for tuned in (k._FORWARD, k._GRAD_X):
        monkeypatch.setattr(tuned, "launch", spy(tuned.launch))
    n, p_in, N = 3, 40, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, n * p_in, generator=g).to(dtype)
    rules, w = torch.randn(n, n, n, generator=g).to(dtype), torch.randn(n, p_in, q_out, generator=g).to(dtype)
    y = k.phm_linear_forward(x, rules, w, None, torch.empty(N, n * q_out, dtype=dtype))
    gx = torch.empty_like(x)
    k.phm_linear_backward(torch.ones_like(y), x, rules, w, gx, None, None, None)
    aligned = dtype == torch.float16 and q_out % 8 == 0
    assert k.mm_align(x, w, p_in, q_out) == (8 if aligned else 1)
    assert kwargs == [{"N_UNROLL": 4, "ALIGN": 8 if aligned else 1}] * 2
    want = [
        k.mm_candidates(0, dtype, q_out, p_in, n, aligned),
        k.mm_candidates(0, dtype, p_in, q_out, n, aligned),
    ]
    assert used == [want[0][0], want[1][0]]
    assert all(c.num_stages == (1 if dtype == torch.float16 and not aligned else 2) for c in used)
    assert used[0].kwargs == k.forward_config(p_in, q_out, dtype, n=n) and used[1].kwargs == k.grad_x_config(
        p_in, q_out, dtype, n=n
    )
    assert not k._FORWARD.tuners and not k._GRAD_X.tuners
    ref = reference(x.double(), rules.double(), w.double())
    torch.testing.assert_close(y.double(), ref, atol=5e-2 if dtype == torch.float16 else 1e-4, rtol=1e-2)


def test_mm_align_and_stages():
    """``ALIGN`` is 8 only for fp16/bf16 with contiguous features, 16-byte aligned bases and rows and
    I, O multiples of 8; otherwise 1, and the fp16/bf16 candidates then ask for 1 stage (2-byte
    loads: no cp.async). fp32 always 1 and 2 stages."""
    from prompt_kernels.kernels import phm_linear as k

    w = torch.zeros(2, 8, 16, dtype=torch.float16)
    x = torch.zeros(4, 16, dtype=torch.float16)
    assert k.mm_align(x, w, 8, 16) == 8
    assert k.mm_align(x, w, 8, 12) == 1  # O not a multiple of 8
    assert k.mm_align(torch.zeros(16, 4, dtype=torch.float16).t(), w, 8, 16) == 1  # strided features
    assert k.mm_align(torch.zeros(4, 20, dtype=torch.float16)[:, :16], w, 8, 16) == 1  # row stride 20
    assert k.mm_align(torch.zeros(4, 17, dtype=torch.float16)[:, 1:], w, 8, 16) == 1  # base off by 2 B
    assert k.mm_align(x.float(), w.float(), 8, 16) == 1
    for arch in (80, 90, 0):
        for dt in (torch.float16, torch.bfloat16):
            assert {c.num_stages for c in k.mm_candidates(arch, dt, 16, 8, 2, aligned=True)} == {2}
            assert {c.num_stages for c in k.mm_candidates(arch, dt, 16, 8, 2, aligned=False)} == {1}
        assert {c.num_stages for c in k.mm_candidates(arch, torch.float32, 16, 8, 2, aligned=False)} == {2}


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_forward_and_grad_x_read_each_input_once(dtype):
    """One program holds every Kronecker block of its rows: x (dy), weights and rules are each read
    once (issued = unique bytes), each output element written once, at an awkward size (n = 3, I = 5,
    O = 7, 5 rows) and at the fp32 launch case's n = 4, I = 24, O = 12 with two row blocks."""
    from prompt_kernels.kernels import phm_linear as k
    from prompt_kernels.tools.traffic import TrafficMeter

    for N, n, p_in, q_out in ((5, 3, 5, 7), (40, 4, 24, 12)):
        x, rules, w, b = make_inputs((N, n * p_in), n * q_out, n, True, dtype)
        dy = torch.randn(N, n * q_out).to(dtype)
        y = torch.full((N, n * q_out), float("nan"), dtype=dtype)
        gx = torch.full_like(x, float("nan"))
        with TrafficMeter() as meter:
            k.phm_linear_forward(x, rules, w, b, y)
            k.phm_linear_backward(dy, x, rules, w, gx, None, None, None)
        fwd, gxl = meter.launches
        assert (fwd.kernel, gxl.kernel) == ("_forward_kernel", "_grad_x_kernel")
        e, np2 = x.element_size(), k.mm_unroll(dtype, n)
        for rec, (cols, red), inp, out in ((fwd, (q_out, p_in), x, y), (gxl, (p_in, q_out), dy, gx)):
            tile = k.mm_candidates(0, dtype, cols, red, n, k.mm_align(inp, w, p_in, q_out) > 1)[0].kwargs
            rb, cc = -(-N // tile["BLOCK_M"]), -(-cols // (tile["BLOCK_N"] // np2))
            assert rec.grid[:2] == (rb, cc)
            bias = b.numel() if rec is fwd else 0
            # inputs once per column chunk, weights (and bias) once per row block, rules per program
            want = cc * inp.numel() + rb * (w.numel() + bias) + rb * cc * rules.numel()
            assert rec.loaded_bytes == want * e, rec.kernel
            assert rec.unique_loaded_bytes == (inp.numel() + w.numel() + bias + rules.numel()) * e
            assert rec.stored_bytes == rec.unique_stored_bytes == out.numel() * e
        assert fwd.grid == (1, 1, 1) or N == 40  # the awkward size: one program, every input read once
        ref = reference(*(t.double() for t in (x, rules, w, b)))
        xx = x.double().requires_grad_()
        (reference(xx, rules.double(), w.double()) * dy.double()).sum().backward()
        tol = {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(y.double(), ref, **tol)
        torch.testing.assert_close(gx.double(), xx.grad, **tol)


def test_large_n_runs_pytorch_on_the_triton_backend(monkeypatch):
    """n > 16 (more blocks than one tile holds) runs the PyTorch path, value and gradients; the
    Triton launchers refuse it."""
    from prompt_kernels.kernels import phm_linear as k

    assert phm_module.TRITON_MAX_N == k.MAX_N_POW2
    n = k.MAX_N_POW2 + 1
    inputs = make_inputs((2, n), 2 * n, n)
    with pytest.raises(ValueError, match="n must be in"):
        k.phm_linear_forward(inputs[0], inputs[1], inputs[2], None, torch.empty(2, 2 * n))
    monkeypatch.setattr(k, "phm_linear_forward", None)  # must not be called
    monkeypatch.setattr(k, "phm_linear_backward", None)
    grad_out = torch.randn(2, 2 * n)
    y, grads = _run("triton", inputs, grad_out)
    _assert_all_within_budget("triton", inputs, grad_out, y, grads)
