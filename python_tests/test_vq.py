"""vq_nearest, vq_quantize and vq_sample on every backend against the float64 reference.

Nearest-code indices must equal the float64 argmin except at numerical near-ties (rows whose two
best float64 distances are closer than the fp32 rounding of the expanded distance, detected from the
float64 distances and excluded); distances within the error budget. The samplers are checked by
distribution (chi-square and a temperature-sensitive mean test, both shown to reject a temperature
off by 10%), reproducibility from the seed, and the straight-through / commitment-loss gradients.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CAN_RUN_TRITON, INTERPRET, assert_within_budget, backends, device_for, require_cpp_build

import prompt_kernels
from prompt_kernels.ops import vq
from prompt_kernels.ops import vq as vq_ops

BACKENDS = backends(has_cpp=True)
# Small shapes everywhere; the interpreter runs the Triton kernels on CPU.
# (N, K, D): batch 1, K = 1, K and D not multiples of the blocks (Triton 64 codes, C++ 256 codes).
SHAPES = [(1, 1, 3), (7, 70, 20), (33, 130, 65)]
CPU_SHAPES = [*SHAPES, (130, 300, 37), (70, 600, 9)]  # several C++ row and code blocks


def _skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    require_cpp_build(backend)
    if backend == "triton" and dtype == torch.bfloat16 and device_for("triton") == "cpu":
        pytest.skip("the Triton interpreter's bf16 support is weak (bf16 is checked on torch/cpp and on GPU)")


def _inputs(N, K, D, dtype, device, batch=None):
    x = torch.randn(*(batch or (N,)), D, dtype=torch.float64).mul(1.5)
    codebook = torch.randn(K, D, dtype=torch.float64)
    return x.to(dtype).to(device), codebook.to(dtype).to(device)


def _float64_distances(x, codebook):
    """``[N, K]`` float64 distances computed directly (no expansion)."""
    x64, e64 = x.reshape(-1, x.shape[-1]).double().cpu(), codebook.double().cpu()
    return (x64[:, None, :] - e64[None, :, :]).pow(2).sum(-1)


def _clear_rows(x, codebook, rel_tol=1e-5):
    """Rows whose best and second-best float64 distances differ by more than the rounding of the
    fp32 expanded distance (``rel_tol * (||x||^2 + max ||e||^2)``): away from numerical ties."""
    d = _float64_distances(x, codebook)
    if d.shape[1] == 1:
        return torch.ones(d.shape[0], dtype=torch.bool)
    two = d.topk(2, dim=1, largest=False).values
    x64 = x.reshape(-1, x.shape[-1]).double().cpu()
    scale = x64.pow(2).sum(-1) + codebook.double().cpu().pow(2).sum(-1).max()
    return (two[:, 1] - two[:, 0]) > rel_tol * scale


# ---------------------------------------------------------------------------------------------
# vq_nearest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_nearest_matches_float64(backend, dtype, shape):
    _skip_unsupported(backend, dtype)
    if backend == "triton" and shape not in SHAPES and device_for("triton") == "cpu":
        pytest.skip("large shapes not under the Triton interpreter (too slow; they run on a GPU)")
    N, K, D = shape
    dev = device_for(backend)
    x, codebook = _inputs(N, K, D, dtype, dev)
    with prompt_kernels.use_backend(backend):
        idx, dist = vq.vq_nearest(x, codebook)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == (N,) and dist.shape == (N,) and idx.device == x.device
    ref_idx, ref_dist = vq_ops.vq_nearest_reference(x.double(), codebook.double())
    _, same_dtype_dist = vq_ops.vq_nearest_reference(x, codebook)
    clear = _clear_rows(x, codebook).to(dev)
    assert clear.float().mean() >= 0.5, "the test lost its power: too many near-ties"
    assert torch.equal(idx[clear], ref_idx[clear])
    # Near-tie rows: the chosen code must be one of the (numerically) nearest.
    d64 = _float64_distances(x, codebook)
    chosen = d64.gather(1, idx.cpu()[:, None])[:, 0]
    scale = x.double().cpu().pow(2).sum(-1) + codebook.double().cpu().pow(2).sum(-1).max()
    assert (chosen - d64.min(1).values <= 1e-5 * scale).all()
    assert_within_budget(
        dist[clear], ref_dist[clear], same_dtype_dist[clear], name=f"distances {backend} {dtype}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_batch_dims_and_degenerate_shapes(backend):
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    x, codebook = _inputs(0, 5, 6, torch.float32, dev, batch=(2, 3))
    with prompt_kernels.use_backend(backend):
        idx, dist = vq.vq_nearest(x, codebook)
        assert idx.shape == (2, 3) and dist.shape == (2, 3)
        ref_idx, _ = vq_ops.vq_nearest_reference(x.double(), codebook.double())
        clear = _clear_rows(x, codebook).reshape(2, 3).to(dev)
        assert torch.equal(idx[clear], ref_idx[clear])
        one_idx, one_dist = vq.vq_nearest(x[0, 0], codebook)  # x: [D] -> scalar outputs
        assert one_idx.shape == () and one_dist.shape == ()
        assert one_idx.item() == idx[0, 0].item()
        empty_idx, empty_dist = vq.vq_nearest(x[:0, 0], codebook)  # no rows
        assert empty_idx.shape == (0,) and empty_dist.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    xt, et = _inputs(11, 9, 13, torch.float32, dev)
    x, codebook = xt.t().contiguous().t(), et.t().contiguous().t()  # column-major views
    assert not x.is_contiguous() and not codebook.is_contiguous()
    with prompt_kernels.use_backend(backend):
        idx, dist = vq.vq_nearest(x, codebook)
        samples = vq.vq_sample(x, codebook, 3, 2.0).indices
    ref_idx, ref_dist = vq_ops.vq_nearest_reference(xt.double(), et.double())
    clear = _clear_rows(xt, et).to(dev)
    assert torch.equal(idx[clear], ref_idx[clear])
    assert torch.allclose(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)
    assert samples.shape == (11, 3) and ((samples >= 0) & (samples < 9)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_exact_ties_go_to_lowest_index(backend):
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    # Codes 5 and 70 (different Triton code tiles) and 300 (a different C++ code block) are equal.
    K, D = 320, 12
    codebook = torch.randn(K, D) * 3
    # The tied codes and the rows near them hold small multiples of 1/8: every product and sum is exact,
    # so duplicate codes score exactly equal in any summation order (the interpreter's numpy matmul
    # may round two columns of a tile differently).
    codebook[5:7] = torch.randint(-3, 4, (2, D)).float()
    codebook[70] = codebook[5]
    codebook[300] = codebook[5]
    codebook[71] = codebook[6]
    near = codebook[5:7] + 0.125 * torch.randint(-1, 2, (2, D)).float()
    x = torch.cat([near, codebook[5:6]])  # the last row sits on code 5
    if backend == "triton":  # keep the interpreter cheap: the first 72 codes hold the ties
        codebook = codebook[:72]
    x, codebook = x.to(dev), codebook.to(dev)
    with prompt_kernels.use_backend(backend):
        idx, dist = vq.vq_nearest(x, codebook)
    assert idx.tolist() == [5, 6, 5]
    assert dist[2].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_far_codes_no_cancellation(backend):
    """Codes of norm 100 (VIP's scale) and x close to one of them: the expanded distance loses
    everything to cancellation in fp32, the direct distance does not."""
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    K, D = 40, 24
    codebook = torch.nn.functional.normalize(torch.randn(K, D), dim=-1) * 100
    x = codebook[[3, 17, 39]] + 1e-3 * torch.randn(3, D)
    x, codebook = x.to(dev), codebook.to(dev)
    with prompt_kernels.use_backend(backend):
        idx, dist = vq.vq_nearest(x, codebook)
    assert idx.tolist() == [3, 17, 39]
    ref = (x.double() - codebook.double()[idx]).pow(2).sum(-1)
    assert torch.allclose(dist.double(), ref, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# vq_nearest on Triton: the split-over-codes path (small N) and the one-pass paths


def _tied_inputs(N, K, D, dtype, device):
    """Random codes with exact duplicates of code 2 at 65 and K - 1 (other splits: slices of 64
    codes); the first rows of ``x`` sit exactly on code 2, the next near it."""
    codebook = torch.randn(K, D, dtype=torch.float64) * 2
    # Code 2 and the rows on or near it hold multiples of 1/8 below 12 (exact products and sums: its
    # duplicates score exactly equal in any summation order, also in fp16/bf16; the interpreter's numpy
    # matmul may round two equal columns of a tile differently otherwise). Code 2 lies far from the
    # random rows, so only the rows placed on or near it can tie.
    codebook[2] = 8 + torch.randint(-3, 4, (D,)).double()
    for k in (65, K - 1):
        if k > 2 and k < K:
            codebook[k] = codebook[2]
    x = torch.randn(N, D, dtype=torch.float64) * 2
    x[: min(N, 2)] = codebook[2]
    x[2:4] = codebook[2] + 0.125 * torch.randint(-1, 2, (len(x[2:4]), D)).double()
    return x.to(dtype).to(device), codebook.to(dtype).to(device)


def _run_triton_nearest(x, codebook, plan=None):
    """The Triton launcher on outputs poisoned with NaN / a sentinel index."""
    from prompt_kernels.kernels import vq as vq_kernels

    N = x.shape[0]
    idx = torch.full((N,), -7, dtype=torch.int64, device=x.device)
    dist = torch.full((N,), float("nan"), dtype=torch.float32, device=x.device)
    vq_kernels.vq_nearest(x, codebook, idx, dist, plan=plan)
    return idx, dist


def _check_nearest(x, codebook, idx, dist, name):
    assert not torch.isnan(dist).any() and (idx >= 0).all() and (idx < codebook.shape[0]).all(), name
    ref_idx, ref_dist = vq_ops.vq_nearest_reference(x.double(), codebook.double())
    ref_idx, ref_dist = ref_idx.to(idx.device), ref_dist.to(idx.device)
    d = _float64_distances(x, codebook).to(idx.device)
    best = d.min(dim=1).values
    scale = x.double().pow(2).sum(-1) + codebook.double().pow(2).sum(-1).max()
    clear = _clear_rows(x, codebook).to(idx.device)
    assert torch.equal(idx[clear], ref_idx[clear]), name
    # Near-ties: a numerically nearest code; exact ties (duplicate codes): the lowest index.
    chosen = d.gather(1, idx[:, None].cpu().to(d.device)).squeeze(1)
    assert (chosen - best <= 1e-5 * scale).all(), name
    # (Against the direct float64 distances: the reference's expanded matrix comes from a BLAS GEMM
    # whose rounding may differ between equal columns.)
    at_min = d == best[:, None]
    exact = at_min.sum(1) > 1
    assert torch.equal(idx[exact], at_min.int().argmax(1)[exact]), name
    _, same_dtype_dist = vq_ops.vq_nearest_reference(x, codebook)
    assert_within_budget(dist[clear], ref_dist[clear], same_dtype_dist[clear], name=name)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 130, 7), (7, 70, 13), (100, 200, 65)])
def test_nearest_split_path_matches_float64(dtype, shape):
    """N = 1, 7, 100 (one or two row tiles); K = 130, 70, 200: 3, 2, 4 slices of 64 codes, the last
    one partial; D odd (one or two feature chunks); duplicate codes in different slices. (Shapes
    this small take the fused one pass in the public op; the split plan is forced.)"""
    from prompt_kernels.kernels import vq as vq_kernels

    N, K, D = shape
    plan = vq_kernels.split_plan(N, K)
    assert plan.splits == -(-K // vq_kernels.NEAREST_BLOCK_N) > 1  # one 64-code tile per split here
    assert not plan.fused_norms and vq_kernels.nearest_plan(N, K, D).fused_norms
    x, codebook = _tied_inputs(N, K, D, dtype, device_for("triton"))
    idx, dist = _run_triton_nearest(x, codebook, plan)
    _check_nearest(x, codebook, idx, dist, f"split {shape} {dtype}")
    if dtype == torch.float32:  # exact ties: rows on code 2 and next to it (codes 65 and K - 1 equal it)
        assert idx[: min(N, 4)].tolist() == [2] * min(N, 4)
        assert dist[: min(N, 2)].tolist() == [0.0] * min(N, 2)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("D", [9, 70])
@pytest.mark.parametrize("plan_kind", ["one pass 64", "one pass 64 fused", "one pass 16", "split 2 slices"])
def test_nearest_forced_plans(plan_kind, D):
    """The large-N path (one pass over 64-row tiles), the small-problem path (the same with the norms
    fused into the scan), the former 16-row tiles, and a split whose slices hold several code tiles
    (K = 200: 128 + 72 codes), at a small N the interpreter can run; D = 9: the row tile stays
    resident (one chunk), D = 70: two chunks, re-loaded per code tile."""
    from prompt_kernels.kernels import vq as vq_kernels

    N, K = 70, 200
    plan = {
        "one pass 64": vq_kernels.NearestPlan(64, 1, K),
        "one pass 64 fused": vq_kernels.NearestPlan(64, 1, K, fused_norms=True),
        "one pass 16": vq_kernels.NearestPlan(16, 1, K),
        "split 2 slices": vq_kernels.NearestPlan(64, 2, 128),
    }[plan_kind]
    x, codebook = _tied_inputs(N, K, D, torch.float32, device_for("triton"))
    idx, dist = _run_triton_nearest(x, codebook, plan)
    _check_nearest(x, codebook, idx, dist, plan_kind)
    assert idx[:4].tolist() == [2] * 4 and dist[:2].tolist() == [0.0, 0.0]


def test_nearest_plan_choice():
    """Small problems (N K D <= SMALL_WORK): one pass with fused norms. Above: small N splits over
    codes (row tiles x splits reach the target, or one code tile per split); from LARGE_N rows, or
    with a single code tile, one pass with the norms pass."""
    from prompt_kernels.kernels import vq as vq_kernels

    big, small = vq_kernels.LARGE_N, vq_kernels.SMALL_WORK
    for N, K, D in [(1, 1, 1), (40, 70, 48), (200, 300, 48), (1, 1000, 384), (small // 1000, 1000, 1)]:
        assert N * K * D <= small
        p = vq_kernels.nearest_plan(N, K, D)
        assert p == vq_kernels.NearestPlan(64, 1, -(-K // 64) * 64, fused_norms=True), (N, K, D, p)
    assert vq_kernels.nearest_plan(small // 1000 + 1, 1000, 1).fused_norms is False
    assert vq_kernels.nearest_plan(big, 1000, 384) == vq_kernels.NearestPlan(64, 1, 1024)
    assert vq_kernels.nearest_plan(1000, 64, 384).splits == 1  # one code tile: nothing to split
    for N, K in [(12, 1000), (40, 1000), (3200, 1000), (big - 1, 1000), (5000, 100_000)]:
        p = vq_kernels.nearest_plan(N, K, 384)
        assert p == vq_kernels.split_plan(N, K) and not p.fused_norms
        row_tiles = -(-N // p.block_m)
        code_tiles = -(-K // vq_kernels.NEAREST_BLOCK_N)
        assert p.block_m == 64 and p.splits > 1, (N, K, p)
        assert p.codes_per_split % vq_kernels.NEAREST_BLOCK_N == 0
        assert (p.splits - 1) * p.codes_per_split < K <= p.splits * p.codes_per_split  # no empty slice
        assert row_tiles * p.splits >= vq_kernels.SPLIT_TARGET_PROGRAMS or p.splits == code_tiles, (N, K, p)


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter counts interpreted launches")
def test_nearest_launcher_takes_fused_path_for_small_problems():
    """The public op on a small problem (N K D <= SMALL_WORK) launches the one-pass kernel alone, with
    the norms fused: x issued once (resident row tile, reused by the epilogue), the codebook once per
    64-row tile, the winners' rows once, the outputs once."""
    from prompt_kernels.kernels import vq as vq_kernels
    from prompt_kernels.tools.traffic import TrafficMeter

    N, K, D = 100, 130, 8
    x, codebook = _inputs(N, K, D, torch.float32, "cpu")
    codebook[3] = 8 + torch.randint(-3, 4, (D,)).float()  # exact scores, far from the rest (_tied_inputs)
    codebook[77] = codebook[3]  # a tie across code tiles
    x[5] = codebook[3]
    with TrafficMeter() as m, prompt_kernels.use_backend("triton"):
        idx, dist = vq.vq_nearest(x, codebook)
    assert [r.kernel for r in m.launches] == ["_nearest_kernel"]
    (one,) = m.launches
    assert one.grid[0] == 2  # two 64-row tiles
    assert one.loaded_bytes == N * D * 4 + 2 * K * D * 4 + N * D * 4
    assert one.stored_bytes == N * 12
    assert idx[5].item() == 3 and dist[5].item() == 0.0
    _check_nearest(x, codebook, idx, dist, "fused")
    assert vq_kernels.nearest_plan(N, K, D).fused_norms


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter counts interpreted launches")
def test_nearest_launcher_takes_split_path_at_small_n():
    """The public op at small N above SMALL_WORK launches the split and reduction kernels (not the
    one-pass kernel), and issues the codebook once per 64-row tile, not once per 16 rows."""
    from prompt_kernels.tools.traffic import TrafficMeter

    N, K, D = 100, 130, 400  # D > 64: two code tiles re-load the row tile per chunk
    x, codebook = _inputs(N, K, D, torch.float32, "cpu")
    with TrafficMeter() as m, prompt_kernels.use_backend("triton"):
        vq.vq_nearest(x, codebook)
    kernels_run = [r.kernel for r in m.launches]
    assert kernels_run == ["_sq_norms_kernel", "_nearest_split_kernel", "_nearest_reduce_kernel"]
    split = m.launches[1]
    assert split.grid[:2] == (2, 3)  # 2 row tiles x 3 slices of the codebook
    codebook_bytes = K * D * 4
    # codebook twice (two row tiles) + x once per code tile (3) + norms twice
    assert split.loaded_bytes == 2 * codebook_bytes + 3 * N * D * 4 + 2 * K * 4
    assert split.stored_bytes == 3 * N * 8  # the partials


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter counts interpreted launches")
def test_nearest_split_keeps_the_row_tile_resident():
    """D <= BLOCK_D: a split program loads its row tile once for all the code tiles of its slice."""
    from prompt_kernels.kernels import vq as vq_kernels
    from prompt_kernels.tools.traffic import TrafficMeter

    N, K, D = 70, 200, 9
    x, codebook = _tied_inputs(N, K, D, torch.float32, "cpu")
    with TrafficMeter() as m:
        idx, dist = _run_triton_nearest(x, codebook, vq_kernels.NearestPlan(64, 2, 128))
    split = next(r for r in m.launches if r.kernel == "_nearest_split_kernel")
    assert split.grid[:2] == (2, 2)
    # x once per slice (2), the codebook once per row tile (2), the norms once per row tile
    assert split.loaded_bytes == 2 * N * D * 4 + 2 * K * D * 4 + 2 * K * 4
    _check_nearest(x, codebook, idx, dist, "split resident")


# ---------------------------------------------------------------------------------------------
# vq_quantize: values and gradients (straight-through, commitment loss)


def _clear_inputs(N, K, D, dtype, device):
    """x near randomly chosen codes: the nearest code is unambiguous in every dtype."""
    codebook = torch.randn(K, D, dtype=torch.float64) * 2
    pick = torch.randint(0, K, (N,))
    x = codebook[pick] + 0.05 * torch.randn(N, D, dtype=torch.float64)
    return x.to(dtype).to(device), codebook.to(dtype).to(device), pick


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_values_and_gradients(backend, dtype):
    _skip_unsupported(backend, dtype)
    dev = device_for(backend)
    N, K, D = 9, 70, 19
    x0, codebook, pick = _clear_inputs(N, K, D, dtype, dev)
    x0 = x0.reshape(3, 3, D)
    g = torch.randn(3, 3, D, dtype=torch.float64)
    wg = 1.7  # gradient of the loss

    def run(fn, x, cb):
        x = x.detach().requires_grad_(True)
        out = fn(x, cb, commitment_weight=0.3)
        (out.quantized * g.to(x.dtype).to(x.device)).sum().add(out.loss * wg).backward()
        return out, x.grad

    with prompt_kernels.use_backend(backend):
        out, grad = run(vq.vq_quantize, x0, codebook)
    ref, ref_grad = run(vq_ops.vq_quantize_reference, x0.double(), codebook.double())
    same, same_grad = run(vq_ops.vq_quantize_reference, x0, codebook)
    assert torch.equal(out.indices.cpu(), pick.reshape(3, 3))
    assert out.quantized.dtype == dtype and out.loss.dtype == dtype and out.loss.shape == ()
    assert_within_budget(out.quantized, ref.quantized, same.quantized, name="quantized")
    assert_within_budget(out.loss, ref.loss, same.loss, name="loss")
    assert_within_budget(grad, ref_grad, same_grad, name="grad x")
    assert codebook.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_formula(backend):
    """The loss and the gradient are those of the documented formulas."""
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    x, codebook, pick = _clear_inputs(5, 9, 7, torch.float32, dev)
    x.requires_grad_(True)
    with prompt_kernels.use_backend(backend):
        out = vq.vq_quantize(x, codebook, commitment_weight=0.25)
    codes = codebook[pick.to(dev)]
    expected_loss = 0.25 * (x.detach() - codes).pow(2).mean()
    assert torch.allclose(out.loss, expected_loss, rtol=1e-5)
    assert torch.allclose(out.quantized, codes, atol=1e-6)
    out.loss.backward()
    assert torch.allclose(x.grad, 0.25 * 2 * (x.detach() - codes) / x.numel(), rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# vq_sample: distribution, reproducibility, gradients


def _designed_inputs(scaled_distances, D, temperature, device, dtype=torch.float32, rows=1):
    """x and a codebook whose squared distances to every x row are ``scaled_distances * temperature``
    (codes placed along random orthonormal directions around the x row)."""
    K = len(scaled_distances)
    centre = torch.randn(D, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(D, K, dtype=torch.float64))
    d = torch.tensor(scaled_distances, dtype=torch.float64) * temperature
    codebook = centre + (q * d.sqrt()).t()
    x = centre.expand(rows, D).contiguous()
    return x.to(dtype).to(device), codebook.to(dtype).to(device)


def _expected_probs(x, codebook, temperature):
    d = _float64_distances(x[:1], codebook)[0]
    return torch.softmax(-d / temperature, dim=0)


def _chi2_pvalue(counts, probs):
    n = counts.sum()
    expected = n * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((probs.numel() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


def _mean_z(samples_d, probs, d):
    """z-score of the mean sampled distance under ``probs`` (the sufficient statistic of the temperature)."""
    mean = (probs * d).sum()
    var = (probs * d * d).sum() - mean**2
    return ((samples_d.mean() - mean) / (var / samples_d.numel()).sqrt()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_distribution(backend):
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    temperature = 3.0
    rows, S = (128, 32) if backend == "triton" else (256, 64)  # 4096 / 16384 draws
    x, codebook = _designed_inputs([0, 1, 2, 3, 4, 5, 6], 9, temperature, dev, rows=rows)
    gen = torch.Generator().manual_seed(1234)
    with prompt_kernels.use_backend(backend):
        out = vq.vq_sample(x, codebook, S, temperature, generator=gen)
    assert out.indices.shape == (rows, S) and out.indices.dtype == torch.int64
    idx = out.indices.cpu().flatten()
    counts = torch.bincount(idx, minlength=codebook.shape[0]).double()
    d = _float64_distances(x[:1], codebook)[0]
    probs = _expected_probs(x, codebook, temperature)
    assert _chi2_pvalue(counts, probs) > 1e-3
    assert abs(_mean_z(d[idx], probs, d)) < 3.3
    # The same draws reject a temperature off by 10% either way: the test has the power it claims.
    for wrong in (temperature * 1.1, temperature / 1.1):
        wrong_probs = _expected_probs(x, codebook, wrong)
        assert _chi2_pvalue(counts, wrong_probs) < 1e-3
        assert abs(_mean_z(d[idx], wrong_probs, d)) > 3.3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_distribution_across_code_blocks(backend):
    """The likely codes sit in different code tiles (Triton: 32 codes, C++: 256), the rest is far:
    the running maximum / streaming switch across tiles keeps the distribution."""
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    K, hot = (70, [3, 40, 69]) if backend == "triton" else (600, [3, 300, 599])
    rows, S = (32, 32) if backend == "triton" else (128, 32)
    x, hot_codes = _designed_inputs([0, 1, 2], 8, 1.0, dev, rows=rows)
    # Every other code at squared distance 100 (probability ~e^-100 relative to the hot ones).
    far = torch.nn.functional.normalize(torch.randn(K, 8, dtype=torch.float64), dim=-1) * 10
    codebook = x[:1].double().cpu() + far
    codebook[hot] = hot_codes.double().cpu()
    codebook = codebook.float().to(dev)
    with prompt_kernels.use_backend(backend):
        out = vq.vq_sample(x, codebook, S, 1.0, generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(out.indices.cpu().flatten(), minlength=K).double()
    assert counts.sum() == counts[hot].sum(), "a code of probability e^-100 was drawn"
    probs = _expected_probs(x, codebook, 1.0)[hot]
    assert _chi2_pvalue(counts[hot], probs / probs.sum()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_seed_reproducibility(backend):
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    x, codebook = _inputs(6, 10, 5, torch.float32, dev)
    with prompt_kernels.use_backend(backend):
        a = vq.vq_sample(x, codebook, 8, 4.0, generator=torch.Generator().manual_seed(3)).indices
        b = vq.vq_sample(x, codebook, 8, 4.0, generator=torch.Generator().manual_seed(3)).indices
        c = vq.vq_sample(x, codebook, 8, 4.0, generator=torch.Generator().manual_seed(4)).indices
        torch.manual_seed(11)
        d = vq.vq_sample(x, codebook, 8, 4.0).indices
        torch.manual_seed(11)
        e = vq.vq_sample(x, codebook, 8, 4.0).indices
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 10)).all()
    # A seed drawn ahead (what a torch.compile'd caller passes) makes the generator's draws.
    with prompt_kernels.use_backend(backend):
        f = vq.vq_sample(x, codebook, 8, 4.0, seed=vq_ops.draw_seed(torch.Generator().manual_seed(3))).indices
        g = vq.vq_sample(x, codebook, 8, 4.0, seed=vq_ops.draw_seed(torch.Generator().manual_seed(4))).indices
    assert torch.equal(f, a) and torch.equal(g, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_single_code_and_shapes(backend):
    _skip_unsupported(backend, torch.float32)
    dev = device_for(backend)
    x, codebook = _inputs(0, 1, 4, torch.float32, dev, batch=(2, 3))
    with prompt_kernels.use_backend(backend):
        out = vq.vq_sample(x, codebook, 5, 1.0)
        assert out.indices.shape == (2, 3, 5) and (out.indices == 0).all()
        assert torch.allclose(out.quantized, codebook[0].expand(2, 3, 4), atol=1e-6)
        empty = vq.vq_sample(x[:0], codebook, 5, 1.0)
        assert empty.indices.shape == (0, 3, 5) and empty.quantized.shape == (0, 3, 4)
        assert empty.loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_values_and_gradients(backend, dtype):
    """quantized = mean of the drawn codes (straight-through), loss and gradient from the formulas,
    against float64 computed from the same draws."""
    _skip_unsupported(backend, dtype)
    dev = device_for(backend)
    N, K, D, S = 6, 11, 13, 5
    x0, codebook = _inputs(N, K, D, dtype, dev)
    g = torch.randn(N, D, dtype=torch.float64)
    x = x0.detach().requires_grad_(True)
    with prompt_kernels.use_backend(backend):
        out = vq.vq_sample(
            x, codebook, S, 2.0, generator=torch.Generator().manual_seed(0), commitment_weight=0.3
        )
    (out.quantized * g.to(dtype).to(dev)).sum().add(out.loss * 1.7).backward()
    idx = out.indices

    def expected(xx, cb):
        xx = xx.detach().requires_grad_(True)
        mean = cb[idx].mean(-2) if cb.dtype == torch.float64 else cb[idx].float().mean(-2).to(cb.dtype)
        q = xx + (mean - xx).detach()
        loss = (0.3 * (xx.double() - mean.double()).pow(2).mean()).to(xx.dtype)
        (q * g.to(xx.dtype).to(xx.device)).sum().add(loss * 1.7).backward()
        return q, loss, xx.grad

    q64, loss64, grad64 = expected(x0.double(), codebook.double())
    q_same, loss_same, grad_same = expected(x0, codebook)
    assert out.quantized.dtype == dtype and out.loss.dtype == dtype
    assert_within_budget(out.quantized, q64, q_same, name="quantized")
    assert_within_budget(out.loss, loss64, loss_same, name="loss")
    assert_within_budget(x.grad, grad64, grad_same, name="grad x")


def test_sample_reference_distribution():
    """The reference itself (torch.multinomial over the full softmax) passes the same test."""
    temperature = 3.0
    x, codebook = _designed_inputs([0, 1, 2, 3, 4, 5, 6], 9, temperature, "cpu", rows=64)
    out = vq_ops.vq_sample_reference(
        x, codebook, 128, temperature, generator=torch.Generator().manual_seed(5)
    )
    idx = out.indices.flatten()
    counts = torch.bincount(idx, minlength=7).double()
    probs = _expected_probs(x, codebook, temperature)
    assert _chi2_pvalue(counts, probs) > 1e-3
    assert _chi2_pvalue(counts, _expected_probs(x, codebook, temperature * 1.1)) < 1e-3


# ---------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    _skip_unsupported(backend, torch.float32)
    x, codebook = _inputs(9, 13, 6, torch.float32, "cpu")
    with prompt_kernels.use_backend(backend):
        torch.library.opcheck(vq_ops._vq_nearest_op, (x, codebook))
        torch.library.opcheck(vq_ops._vq_sample_op, (x, codebook, 3, 2.0, torch.tensor(5)))


def test_torch_compile_fullgraph():
    x, codebook = _inputs(9, 13, 6, torch.float32, "cpu")

    def f(x, codebook):
        a = vq.vq_quantize(x, codebook)
        b = vq.vq_sample(x, codebook, 4, 2.0)
        idx, dist = vq.vq_nearest(x, codebook)
        return a.quantized, a.loss, b.quantized, b.indices, idx, dist

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, loss, sq, sidx, idx, dist = compiled(x, codebook)
    eq, eloss, _, _, eidx, edist = f(x, codebook)
    assert (
        torch.equal(idx, eidx)
        and torch.allclose(dist, edist)
        and torch.allclose(q, eq)
        and torch.allclose(loss, eloss)
    )
    assert sidx.shape == (9, 4) and sq.shape == x.shape


# ---------------------------------------------------------------------------------------------
# bad input


def test_floors():
    f = vq_ops.vq_nearest_floors(3200, 1000, 384, 4)
    assert f.forward_bytes == 4 * (3200 * 384 + 1000 * 384) + 3200 * 12
    assert f.forward_flops == 2 * 3200 * 1000 * 384
    q = vq_ops.vq_quantize_floors(3200, 1000, 384, 4)
    s = vq_ops.vq_sample_floors(3200, 1000, 384, 10, 4)
    assert q.forward_bytes > f.forward_bytes and s.forward_flops > f.forward_flops and q.backward_bytes > 0


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, e: vq.vq_nearest(x, e[:, :-1]), ValueError, "x must have shape"),
        (lambda x, e: vq.vq_nearest(x, e[:0]), ValueError, "at least one code"),
        (lambda x, e: vq.vq_nearest(x, e[0]), ValueError, "codebook must have 2 dimensions"),
        (lambda x, e: vq.vq_nearest(x.long(), e), TypeError, "x must have dtype"),
        (lambda x, e: vq.vq_nearest(x, e.double()), TypeError, "codebook must have dtype"),
        (lambda x, e: vq.vq_nearest(x.half(), e), TypeError, "codebook must have the same dtype"),
        (lambda x, e: vq.vq_nearest(x.numpy(), e), TypeError, "x must be a torch.Tensor"),
        (lambda x, e: vq.vq_nearest(x[..., :0], e[:, :0]), ValueError, "non-empty last dimension"),
        (lambda x, e: vq.vq_quantize(x, e, commitment_weight="0.1"), TypeError, "commitment_weight"),
        (lambda x, e: vq.vq_sample(x, e, 0, 1.0), ValueError, "num_samples must be >= 1"),
        (lambda x, e: vq.vq_sample(x, e, 2.0, 1.0), TypeError, "num_samples must be an int"),
        (lambda x, e: vq.vq_sample(x, e, 2, 0.0), ValueError, "temperature must be positive"),
        (lambda x, e: vq.vq_sample(x, e, 2, -1.0), ValueError, "temperature must be positive"),
        (lambda x, e: vq.vq_sample(x, e, 2, float("inf")), ValueError, "temperature must be positive"),
        (lambda x, e: vq.vq_sample(x, e, 2, "1"), TypeError, "temperature must be a float"),
        (lambda x, e: vq.vq_sample(x, e, 2, 1.0, generator=3), TypeError, "generator"),
        (lambda x, e: vq.vq_sample(x, e, 2, 1.0, seed=3), TypeError, "seed must be an int64"),
        (lambda x, e: vq.vq_sample(x, e, 2, 1.0, seed=torch.zeros(1, dtype=torch.long)), TypeError, "seed"),
        (
            lambda x, e: vq.vq_sample(x, e, 2, 1.0, generator=torch.Generator(), seed=vq_ops.draw_seed()),
            ValueError,
            "either generator or seed",
        ),
        (lambda x, e: vq.vq_sample(x.int(), e, 2, 1.0), TypeError, "x must have dtype"),
        (lambda x, e: vq.vq_sample(x, e[:, :2], 2, 1.0), ValueError, "x must have shape"),
        (lambda x, e: vq.vq_sample(x, e[:0], 2, 1.0), ValueError, "at least one code"),
        (lambda x, e: vq_ops.vq_nearest_reference(x, e[:, :-1]), ValueError, "x must have shape"),
    ],
)
def test_bad_inputs(call, exc, match):
    x, e = _inputs(4, 5, 3, torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        call(x, e)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device to put the tensors on two devices"
)
def test_device_mismatch():
    x, e = _inputs(4, 5, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="same device"):
        vq.vq_nearest(x, e.cuda())


@pytest.mark.skipif(not INTERPRET, reason="the fixed tile is the interpreter's (a GPU autotunes)")
def test_interpreter_launches_the_fixed_tile(monkeypatch):
    """Both scan paths use the first candidate of the default row under the interpreter, no autotuner."""
    from prompt_kernels.kernels import vq as k

    used = []
    for tuned in (k._NEAREST, k._NEAREST_SPLIT):
        monkeypatch.setattr(tuned, "launch", lambda *a, _o=tuned.launch, **kw: used.append(_o(*a, **kw)))
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(40, 24, generator=g), torch.randn(70, 24, generator=g)
    for plan in (k.NearestPlan(k.NEAREST_BLOCK_M, 1, 70), k.split_plan(40, 70)):
        idx, dist = torch.empty(40, dtype=torch.int64), torch.empty(40)
        k.vq_nearest(x, codebook, idx, dist, plan=plan)
        torch.testing.assert_close(idx, torch.cdist(x, codebook).argmin(1))
    fixed = k.scan_candidates(0, torch.float32, 24)[0]
    assert k.split_plan(40, 70).splits > 1 and used == [fixed, fixed]
    # fp32 with the row tile resident (D = 24 <= BLOCK_D): 32-code tiles (64 x 64 spills there)
    assert fixed.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 64, "X_RESIDENT": 1}
    assert fixed.num_warps == 8
    assert not k._NEAREST.tuners and not k._NEAREST_SPLIT.tuners


@pytest.mark.skipif(not INTERPRET, reason="runs the sm_90 tile through the interpreter")
def test_sample_tiles_same_draws(monkeypatch):
    """Three sampler tiles draw exactly the same (the noise depends on (seed, row, sample, code)
    only): the default row's 32-row fp16 tile with fused norms, sm_90's 64-row tile (wgmma's rows per
    warpgroup) with the separate norms pass, and the small-launch 64 x 64 tile. Run through the
    interpreter, each is the launched tile (grid, kernels). N = 70: one full and one partial 64-row
    tile; K = 37 and S = 5 not multiples of the blocks."""
    from prompt_kernels.kernels import vq as k
    from prompt_kernels.tools.traffic import TrafficMeter

    N, K, D, S = 70, 37, 16, 5
    x, codebook = _inputs(N, K, D, torch.float16, "cpu")
    assert k.sample_config(90, torch.float16, D).kwargs["BLOCK_M"] == 64
    assert k.sample_config(0, torch.float16, D).kwargs["BLOCK_M"] == 32
    assert k.sample_small(N, S)
    out = {}
    for arch, small in ((0, False), (90, False), (0, True), (90, True)):
        monkeypatch.setattr(k, "launch_arch", lambda device=None, arch=arch: arch)
        monkeypatch.setattr(k, "SAMPLE_SMALL_PROGRAMS", 64 if small else 0)
        assert k.sample_small(N, S) == small
        cfg = k.sample_config(arch, torch.float16, D, small)
        idx = torch.full((N, S), -7, dtype=torch.int64)
        with TrafficMeter() as m:
            k.vq_sample(x, codebook, S, 2.0, 99, idx)
        # the norms fused into the sampler (one launch) except sm_90's regular tile (norms pass)
        fused = cfg.kwargs["FUSED_NORMS"]
        assert fused == (small or arch != 90)
        expected = ["_sample_kernel"] if fused else ["_sq_norms_kernel", "_sample_kernel"]
        assert [r.kernel for r in m.launches] == expected
        assert cfg.kwargs["BLOCK_N"] == (64 if small else 32)
        assert m.launches[-1].grid[:2] == (-(-N // cfg.kwargs["BLOCK_M"]), 1)
        assert ((idx >= 0) & (idx < K)).all()
        out[arch, small] = idx
    for key in out:
        assert torch.equal(out[key], out[0, False]), key


def test_sample_small_rule():
    """The small-launch tile while 64-row tiles x 16-sample blocks give at most 64 programs."""
    from prompt_kernels.kernels import vq as k

    assert k.sample_small(1, 1) and k.sample_small(40, 3) and k.sample_small(64 * 64, 16)
    assert k.sample_small(64, 16 * 64) and not k.sample_small(64, 16 * 64 + 1)
    assert not k.sample_small(64 * 64 + 1, 16) and not k.sample_small(100_000, 1)
    for arch in (0, 80, 90):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            c = k.sample_config(arch, dt, 48, small=True)
            assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["FUSED_NORMS"]) == (64, 64, 1)


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter counts interpreted launches")
@pytest.mark.parametrize("small", [True, False])
def test_sample_fp32_one_launch_codebook_once_per_row_tile(monkeypatch, small):
    """fp32 sampler: 64-row tiles, norms fused (one launch); the codebook is issued once per row
    tile and sample block, x once per code tile (64 codes for a small launch, else 32), the indices
    written once. N = 65: two row tiles, the second of one row; K = 33: one or two code tiles, the
    last of one code; S = 17: two sample blocks."""
    from prompt_kernels.kernels import vq as k
    from prompt_kernels.tools.traffic import TrafficMeter

    N, K, D, S = 65, 33, 5, 17
    assert k.sample_small(N, S)
    if not small:
        monkeypatch.setattr(k, "SAMPLE_SMALL_PROGRAMS", 0)
    x, codebook = _inputs(N, K, D, torch.float32, "cpu")
    idx = torch.full((N, S), -7, dtype=torch.int64)
    with TrafficMeter() as m:
        k.vq_sample(x, codebook, S, 1.5, 5, idx)
    (run,) = m.launches
    assert run.kernel == "_sample_kernel" and run.grid[:2] == (2, 2)
    code_tiles = 1 if small else 2
    # per sample block: the codebook once per row tile, x once per code tile
    assert run.loaded_bytes == 2 * (2 * K * D * 4 + code_tiles * N * D * 4)
    assert run.stored_bytes == N * S * 8
    assert ((idx >= 0) & (idx < K)).all()
