"""prompt_kernels.nn.VectorQuantizer: forward, EMA updates (VIP and VQ-VAE) against hand-computed
steps, Laplace smoothing, dead-code reset, initialisation and bad arguments."""

from __future__ import annotations

import pytest
import torch

from prompt_kernels.nn import VectorQuantizer
from prompt_kernels.ops import VQOutput, VQSampleOutput


def _batch_stats(x, indices, K):
    """Hand-computed batch statistics in float64: counts c_k / S and m_k = (sum of rows that drew k,
    with multiplicity) / S, by explicit loops."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    drawn = indices.reshape(rows.shape[0], -1)
    S = drawn.shape[1]
    counts = torch.zeros(K, dtype=torch.float64)
    sums = torch.zeros(K, rows.shape[1], dtype=torch.float64)
    for i in range(rows.shape[0]):
        for s in range(S):
            k = int(drawn[i, s])
            counts[k] += 1
            sums[k] += rows[i]
    return counts / S, sums / S


def _laplace(n, eps):
    total = n.sum()
    return (n + eps) / (total + n.numel() * eps) * total


@pytest.mark.parametrize("mode", ["nearest", "sample"])
def test_forward_outputs_and_no_codebook_gradient(mode):
    vq = VectorQuantizer(6, 10, mode=mode, num_samples=4, temperature=2.0)
    x = torch.randn(3, 5, 6, requires_grad=True)
    out = vq(x)
    assert isinstance(out, VQOutput if mode == "nearest" else VQSampleOutput)
    assert out.quantized.shape == x.shape
    assert out.indices.shape == ((3, 5) if mode == "nearest" else (3, 5, 4))
    assert out.loss.shape == ()
    assert vq.commitment_weight == (0.25 if mode == "nearest" else 0.1)
    g = torch.randn_like(x)
    (out.quantized * g).sum().add(out.loss).backward()  # after the in-place EMA update
    expected = g + vq.commitment_weight * 2 * (x.detach() - out.quantized.detach()) / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert not vq.codebook.requires_grad and list(vq.parameters()) == []
    assert set(vq.state_dict()) == {"codebook", "cluster_size"}


@pytest.mark.parametrize("mode", ["nearest", "sample"])
def test_vip_ema_step_by_hand(mode):
    K, D, g, eps = 5, 3, 0.9, 0.05
    vq = VectorQuantizer(D, K, mode=mode, num_samples=3, temperature=4.0, ema="vip", decay=g, eps=eps)
    e0 = vq.codebook.double().clone()
    n0 = vq.cluster_size.double().clone()
    assert torch.allclose(n0, torch.full((K,), 1.0 / K, dtype=torch.float64))
    x = torch.randn(7, D) * 1.5
    out = vq(x)
    c, m = _batch_stats(x, out.indices, K)
    n1 = _laplace(g * n0 + (1 - g) * c, eps)
    e1 = g * e0 + (1 - g) * m / n1[:, None]
    assert torch.allclose(vq.cluster_size.double(), n1, rtol=1e-5)
    assert torch.allclose(vq.codebook.double(), e1, rtol=1e-5, atol=1e-6)
    # A second step starts from the stored (smoothed) counts.
    x2 = torch.randn(4, D)
    out2 = vq(x2)
    c2, m2 = _batch_stats(x2, out2.indices, K)
    n2 = _laplace(g * n1 + (1 - g) * c2, eps)
    assert torch.allclose(vq.cluster_size.double(), n2, rtol=1e-5)
    assert torch.allclose(vq.codebook.double(), g * e1 + (1 - g) * m2 / n2[:, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["nearest", "sample"])
def test_vqvae_ema_step_by_hand(mode):
    K, D, g, eps = 6, 4, 0.8, 0.01
    vq = VectorQuantizer(D, K, mode=mode, num_samples=2, temperature=3.0, ema="vqvae", decay=g, eps=eps)
    e0 = vq.codebook.double().clone()
    assert torch.equal(vq.cluster_size, torch.ones(K)) and torch.equal(vq.embed_sum, vq.codebook)
    x = torch.randn(2, 4, D)
    out = vq(x)
    c, m = _batch_stats(x, out.indices, K)
    n1 = g * 1.0 + (1 - g) * c  # stored unsmoothed
    M1 = g * e0 + (1 - g) * m
    assert torch.allclose(vq.cluster_size.double(), n1, rtol=1e-6)
    assert torch.allclose(vq.embed_sum.double(), M1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(vq.codebook.double(), M1 / _laplace(n1, eps)[:, None], rtol=1e-5, atol=1e-6)
    assert set(vq.state_dict()) == {"codebook", "cluster_size", "embed_sum"}


def test_laplace_smoothing_keeps_total_and_lifts_unused_codes():
    K, D = 8, 2
    vq = VectorQuantizer(D, K, ema="vip", decay=0.5, eps=0.1)
    # Every row sits on code 0: codes 1..7 get no count in this batch.
    x = vq.codebook[:1].expand(5, D).clone()
    before = vq.cluster_size.clone()
    out = vq(x)
    assert (out.indices == 0).all()
    raw = 0.5 * before + 0.5 * torch.tensor([5.0] + [0.0] * (K - 1))
    assert torch.allclose(vq.cluster_size.sum(), raw.sum(), rtol=1e-6)  # smoothing keeps sum N
    assert (vq.cluster_size[1:] > 0.5 * before[1:]).all()  # the unused codes are lifted by ε
    assert torch.allclose(vq.cluster_size, (raw + 0.1) / (raw.sum() + K * 0.1) * raw.sum(), rtol=1e-6)
    # Without smoothing the unused codes would just decay.
    vq0 = VectorQuantizer(D, K, ema="vip", decay=0.5, eps=0.0)
    vq0.codebook.copy_(vq.codebook)
    vq0(vq0.codebook[:1].expand(5, D).clone())
    assert torch.allclose(vq0.cluster_size[1:], 0.5 * before[1:])


@pytest.mark.parametrize("ema", ["vip", "vqvae"])
def test_dead_code_reset(ema):
    K, D = 6, 5
    vq = VectorQuantizer(D, K, ema=ema, decay=0.2, dead_code_threshold=0.3)
    x = vq.codebook[:2].repeat(4, 1) + 0.01 * torch.randn(8, D)  # only codes 0 and 1 are used
    out = vq(x)
    assert set(out.indices.tolist()) == {0, 1}
    dead = torch.arange(K) >= 2  # counts 0.2 * N_0 (+ smoothing) < 0.3
    assert torch.allclose(vq.cluster_size[dead], torch.full((4,), 0.3))
    assert (vq.cluster_size[~dead] > 0.3).all()
    for k in dead.nonzero()[:, 0].tolist():  # each reset code is one of the batch rows
        assert (vq.codebook[k] == x).all(-1).any()
    if ema == "vqvae":
        assert torch.allclose(vq.embed_sum[dead], 0.3 * vq.codebook[dead])
    # Off by default: the unused codes keep their EMA values.
    vq_off = VectorQuantizer(D, K, ema=ema, decay=0.2)
    vq_off(vq_off.codebook[:2].repeat(4, 1).clone())
    assert vq_off.cluster_size[2:].max() < 0.3
    assert not any((vq_off.codebook[k] == vq_off.codebook[:2]).all(-1).any() for k in range(2, K))


def test_eval_mode_does_not_update():
    vq = VectorQuantizer(4, 7, mode="sample", num_samples=3, temperature=1.0).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(5, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())


def test_initialisation_from_rows_and_scaling():
    rows = torch.randn(50, 8)
    rows[3] = 0.0  # an all-zero row is skipped when normalising
    vq = VectorQuantizer(8, 20, init_rows=rows)
    assert all((vq.codebook[k] == rows).all(-1).any() for k in range(20))
    assert len({tuple(r.tolist()) for r in vq.codebook}) == 20  # without replacement
    vq = VectorQuantizer(8, 30, init_rows=rows, init_scale=100.0)
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.full((30,), 100.0))
    unit = torch.nn.functional.normalize(rows, dim=-1)
    assert all(((vq.codebook[k] / 100 - unit).abs().max(-1).values < 1e-6).any() for k in range(30))
    vq = VectorQuantizer(8, 80, init_rows=rows[:5], l2_normalize_init=True)  # fewer rows than codes
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(80))
    assert VectorQuantizer(8, 4).codebook.shape == (4, 8)


def test_seeded_generator_reproduces_samples():
    vq = VectorQuantizer(4, 9, mode="sample", num_samples=6, temperature=1.0).eval()
    x = torch.randn(3, 4)
    a = vq(x, generator=torch.Generator().manual_seed(1)).indices
    b = vq(x, generator=torch.Generator().manual_seed(1)).indices
    assert torch.equal(a, b)


def test_half_input_keeps_float32_buffers():
    vq = VectorQuantizer(4, 9)
    out = vq(torch.randn(5, 4).half())
    assert out.quantized.dtype == torch.float16 and vq.codebook.dtype == torch.float32
    assert torch.isfinite(vq.codebook).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"dim": 0}, ValueError, "dim"),
        ({"codebook_size": 0}, ValueError, "codebook_size"),
        ({"mode": "gumbel"}, ValueError, "mode"),
        ({"ema": "adam"}, ValueError, "ema"),
        ({"decay": 1.0}, ValueError, "decay"),
        ({"decay": -0.1}, ValueError, "decay"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"dead_code_threshold": -1.0}, ValueError, "dead_code_threshold"),
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"init_rows": torch.randn(5, 3)}, ValueError, "init_rows"),
        ({"init_rows": torch.ones(5, 4, dtype=torch.long)}, TypeError, "init_rows"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"dim": 4, "codebook_size": 6, **kwargs}
    with pytest.raises(exc, match=match):
        VectorQuantizer(**args)


def test_bad_input():
    vq = VectorQuantizer(4, 6)
    with pytest.raises(ValueError, match="x must have shape"):
        vq(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must have dtype"):
        vq(torch.ones(3, 4, dtype=torch.long))
