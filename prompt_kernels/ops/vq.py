"""Vector quantisation against a codebook: nearest code, straight-through quantisation, sampling.

    x:        [..., D]
    codebook: [K, D]                       (same dtype and device as x, K >= 1)

    vq_nearest(x, codebook)               -> indices int64 [...], distances float32 [...]
    vq_quantize(x, codebook, w=0.25)      -> VQOutput(quantized [..., D], indices [...], loss [])
    vq_sample(x, codebook, S, temperature, generator=None, commitment_weight=0.1)
                                          -> VQSampleOutput(quantized [..., D], indices [..., S], loss [])

``vq_nearest``: ``distances[i] = min_k ||x_i - e_k||^2``, ``indices[i]`` the lowest ``k`` reaching it.
Not differentiable. The backends never store the ``N x K`` distance matrix (O(N + K) extra memory):
one tiled pass keeps a running minimum of ``||e_k||^2 - 2 x.e_k`` per row; the returned distance is
recomputed directly as ``sum((x - e_best)^2)``, which is more accurate than the expanded form.

``vq_quantize``: ``quantized = x + (codebook[indices] - x).detach()`` (straight-through),
``loss = commitment_weight * mean((x - codebook[indices].detach())^2)``. The codebook gets no
gradient (it is meant to be updated by EMA, see ``prompt_kernels.nn.VectorQuantizer``).

``vq_sample``: ``S`` independent draws per row from ``softmax_k(-||x - e_k||^2 / temperature)``,
``quantized = x + (mean_s codebook[indices[..., s]] - x).detach()``, ``loss = commitment_weight *
mean((x - mean_code.detach())^2)``. The seed of the draws comes from ``generator`` (a CPU
``torch.Generator``; None = torch's default generator), so a seeded generator reproduces the samples
on a given backend. The backends sample the same distribution but not the same draws: Triton uses
the Gumbel-max trick with Philox noise of (seed, row, sample, code); the C++ kernel samples exactly
by streaming inverse CDF over code blocks; the reference uses ``torch.multinomial``.

The losses are computed in float32 and returned in x's dtype; with no rows they are 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from prompt_kernels import _alloc, _backend, _cpp, _validate
from prompt_kernels.floors import (  # noqa: F401  (the op's floors, re-exported)
    VQFloors,
    vq_nearest_floors,
    vq_quantize_floors,
    vq_sample_floors,
)

_SEED_BOUND = 2**31 - 1  # seeds are drawn in [0, 2^31 - 1): a valid Philox key for every backend


class VQOutput(NamedTuple):
    quantized: torch.Tensor  # [..., D], x's dtype, straight-through to x
    indices: torch.Tensor  # int64 [...]
    loss: torch.Tensor  # [] commitment loss, x's dtype


class VQSampleOutput(NamedTuple):
    quantized: torch.Tensor  # [..., D], the mean of the sampled codes, straight-through to x
    indices: torch.Tensor  # int64 [..., num_samples]
    loss: torch.Tensor  # [] commitment loss against the mean code, x's dtype


# ---------------------------------------------------------------------------------------------
# validation


def _check(x, codebook, dtypes=_validate.FLOAT_DTYPES) -> tuple[int, int]:
    """Validate ``x`` and ``codebook``; returns ``(K, D)``."""
    _validate.tensor("x", x, min_ndim=1, dtypes=dtypes)
    _validate.tensor("codebook", codebook, ndim=2, dtypes=dtypes)
    _validate.same_dtype("x", x, codebook=codebook)
    _validate.same_device("x", x, codebook=codebook)
    K, D = codebook.shape
    if K < 1:
        raise ValueError(
            f"codebook must have at least one code (shape [K >= 1, D]), got shape {tuple(codebook.shape)}"
        )
    if D < 1:
        raise ValueError(
            f"codebook must have a non-empty last dimension D, got shape {tuple(codebook.shape)}"
        )
    if x.shape[-1] != D:
        raise ValueError(f"x must have shape [..., D={D}] (D from codebook [K, D]), got {tuple(x.shape)}")
    return K, D


def _check_weight(commitment_weight) -> float:
    if isinstance(commitment_weight, bool) or not isinstance(commitment_weight, (int, float)):
        raise TypeError(f"commitment_weight must be a float, got {type(commitment_weight).__name__}")
    if not math.isfinite(commitment_weight):
        raise ValueError(f"commitment_weight must be finite, got {commitment_weight}")
    return float(commitment_weight)


def _check_sampling(num_samples, temperature) -> tuple[int, float]:
    _validate.positive_int("num_samples", num_samples)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return num_samples, float(temperature)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (it only draws the seed), got {generator.device}"
        )


def _draw_seed(generator) -> torch.Tensor:
    """The kernels' seed: one int64 in [0, 2^31 - 1) drawn on CPU from ``generator``."""
    return torch.randint(0, _SEED_BOUND, (), generator=generator, dtype=torch.int64)


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """The seed ``vq_sample`` would draw from ``generator`` (None: the global generator), as the
    ``int64`` CPU scalar tensor its ``seed=`` argument takes: drawing it once, outside a compiled
    region, lets a traced call sample reproducibly without a ``torch.Generator`` object in the graph."""
    _check_generator(generator)
    return _draw_seed(generator)


def _seed_of(generator, seed) -> torch.Tensor:
    _check_generator(generator)
    if seed is None:
        return _draw_seed(generator)
    if generator is not None:
        raise ValueError("pass either generator or seed to vq_sample, not both")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.dim() != 0 or seed.is_cuda:
        raise TypeError("seed must be an int64 CPU scalar tensor (see prompt_kernels.ops.vq.draw_seed)")
    return seed


# ---------------------------------------------------------------------------------------------
# shared pieces: the straight-through output and the commitment loss


def _commitment(x: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * mean((x - target.detach())^2)`` in float32, returned in x's dtype (0 with no rows)."""
    diff = x.float() - target.detach().float()
    return (diff.pow(2).sum() * (weight / max(x.numel(), 1))).to(x.dtype)


def _straight_through(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return x + (target - x).detach()


def _quantized_and_loss(
    x: torch.Tensor, target: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops' memory-lean form of ``(_straight_through(x, target), _commitment(x, target, weight))``.

    ``target`` must be a fresh tensor without grad (it is overwritten): ``diff = target - x`` is
    computed in place, ``quantized = x + diff.detach()`` (the same rounding as the formula) and the
    loss is ``weight * dot(diff, diff) / numel`` in float32, whose gradient is the formula's
    ``2 weight (x - target) / numel``. Peak extra memory: two ``[..., D]`` tensors (diff, quantized).
    """
    diff = target.sub_(x)
    quantized = x + diff.detach()
    flat = diff.reshape(-1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    loss = (torch.dot(flat, flat) * (weight / max(x.numel(), 1))).to(x.dtype)
    return quantized, loss


def _opmath(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# references (the specification; they materialise the N x K distance matrix)


def _distance_matrix(x2: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` squared distances ``||x||^2 - 2 x.e + ||e||^2`` in float32 (float64 for float64)."""
    xf, ef = x2.to(_opmath(x2)), codebook.to(_opmath(x2))
    return xf.pow(2).sum(-1, keepdim=True) - 2.0 * (xf @ ef.t()) + ef.pow(2).sum(-1)


def vq_nearest_reference(x, codebook):
    """Plain-PyTorch specification: the full distance matrix, ``argmin`` (first index on ties), then
    the winning distance recomputed as ``sum((x - e)^2)``. Distances are float32 (float64 for
    float64 inputs, the ground truth of the tests)."""
    _, D = _check(x, codebook, _validate.REFERENCE_DTYPES)
    x2 = x.detach().reshape(-1, D)
    e = codebook.detach()
    indices = _distance_matrix(x2, e).argmin(-1)
    ct = _opmath(x2)
    distances = (x2.to(ct) - e.to(ct)[indices]).pow(2).sum(-1)
    return indices.reshape(x.shape[:-1]), distances.reshape(x.shape[:-1])


def vq_quantize_reference(x, codebook, commitment_weight=0.25):
    weight = _check_weight(commitment_weight)
    indices, _ = vq_nearest_reference(x, codebook)
    codes = codebook.detach()[indices]
    return VQOutput(_straight_through(x, codes), indices, _commitment(x, codes, weight))


def _sample_torch(x2, codebook, num_samples, temperature, seed) -> torch.Tensor:
    """``[N, S]`` draws by ``torch.multinomial`` from the exact softmax (float64 for float64 input)."""
    logits = -_distance_matrix(x2, codebook) / temperature
    probs = torch.softmax(logits.double() if x2.dtype == torch.float64 else logits, dim=-1)
    gen = torch.Generator(device=x2.device)
    gen.manual_seed(int(seed))
    if probs.shape[0] == 0:
        return torch.empty((0, num_samples), dtype=torch.int64, device=x2.device)
    return torch.multinomial(probs, num_samples, replacement=True, generator=gen)


def vq_sample_reference(x, codebook, num_samples, temperature, generator=None, commitment_weight=0.1):
    """Plain-PyTorch specification: softmax over the full distance matrix, ``torch.multinomial``
    with replacement, mean of the drawn codes."""
    _, D = _check(x, codebook, _validate.REFERENCE_DTYPES)
    num_samples, temperature = _check_sampling(num_samples, temperature)
    weight = _check_weight(commitment_weight)
    _check_generator(generator)
    seed = _draw_seed(generator)
    x2 = x.detach().reshape(-1, D)
    indices = _sample_torch(x2, codebook.detach(), num_samples, temperature, seed)
    mean_code = codebook.detach()[indices].mean(-2).reshape(x.shape)
    return VQSampleOutput(
        _straight_through(x, mean_code),
        indices.reshape(*x.shape[:-1], num_samples),
        _commitment(x, mean_code, weight),
    )


# ---------------------------------------------------------------------------------------------
# custom ops (not differentiable: the public functions call them on detached tensors)


def _has_cpp(name: str) -> bool:
    # Extension not built at all: say True so that `select` warns and falls back (or raises for "cpp").
    return _cpp.has(name) if _cpp.available() else True


@torch.library.custom_op("prompt_kernels::vq_nearest", mutates_args=())
def _vq_nearest_op(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [N, D]``, ``codebook: [K, D]`` -> ``(indices int64 [N], distances float32 [N])``."""
    backend = _backend.select("vq_nearest", x.device, _has_cpp("vq_nearest"))
    if backend == "torch":
        indices, distances = vq_nearest_reference(x, codebook)
        return indices, distances.float()
    x, codebook = x.contiguous(), codebook.contiguous()
    N = x.shape[0]
    indices = _alloc.empty((N,), dtype=torch.int64, device=x.device)
    distances = _alloc.empty((N,), dtype=torch.float32, device=x.device)
    if N == 0:
        return indices, distances
    if backend == "cpp":
        _cpp.op("vq_nearest")(x, codebook, indices, distances)
    else:
        from prompt_kernels.kernels import vq as kernels

        kernels.vq_nearest(x, codebook, indices, distances)
    return indices, distances


@_vq_nearest_op.register_fake
def _(x, codebook):
    N = x.shape[0]
    return x.new_empty((N,), dtype=torch.int64), x.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("prompt_kernels::vq_sample_indices", mutates_args=())
def _vq_sample_op(
    x: torch.Tensor, codebook: torch.Tensor, num_samples: int, temperature: float, seed: torch.Tensor
) -> torch.Tensor:
    """``x: [N, D]``, ``codebook: [K, D]``, ``seed``: int64 scalar (CPU) -> int64 ``[N, num_samples]``."""
    backend = _backend.select("vq_sample", x.device, _has_cpp("vq_sample"))
    seed_value = int(seed.item())
    if backend == "torch":
        return _sample_torch(x, codebook, num_samples, temperature, seed_value)
    x, codebook = x.contiguous(), codebook.contiguous()
    indices = _alloc.empty((x.shape[0], num_samples), dtype=torch.int64, device=x.device)
    if x.shape[0] == 0:
        return indices
    if backend == "cpp":
        _cpp.op("vq_sample")(x, codebook, num_samples, temperature, seed_value, indices)
    else:
        from prompt_kernels.kernels import vq as kernels

        kernels.vq_sample(x, codebook, num_samples, temperature, seed_value, indices)
    return indices


@_vq_sample_op.register_fake
def _(x, codebook, num_samples, temperature, seed):
    return x.new_empty((x.shape[0], num_samples), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# public ops


def vq_nearest(x, codebook):
    """Nearest code per row of ``x`` (see the module docstring). Returns ``(indices, distances)``."""
    _, D = _check(x, codebook)
    indices, distances = _vq_nearest_op(x.detach().reshape(-1, D), codebook.detach())
    return indices.reshape(x.shape[:-1]), distances.reshape(x.shape[:-1])


def vq_quantize(x, codebook, commitment_weight=0.25) -> VQOutput:
    """Nearest-code quantisation, straight-through, with the commitment loss."""
    weight = _check_weight(commitment_weight)
    indices, _ = vq_nearest(x, codebook)
    quantized, loss = _quantized_and_loss(x, F.embedding(indices, codebook.detach()), weight)
    return VQOutput(quantized, indices, loss)


def vq_sample(
    x, codebook, num_samples, temperature, generator=None, commitment_weight=0.1, *, seed=None
) -> VQSampleOutput:
    """``num_samples`` codes per row drawn from ``softmax(-||x - e_k||^2 / temperature)``; the mean
    code, straight-through, and the commitment loss against it. ``seed``: a seed from
    :func:`draw_seed` used instead of drawing one from ``generator`` (the same draws as passing that
    generator)."""
    _, D = _check(x, codebook)
    num_samples, temperature = _check_sampling(num_samples, temperature)
    weight = _check_weight(commitment_weight)
    seed = _seed_of(generator, seed)
    x2 = x.detach().reshape(-1, D)
    indices = _vq_sample_op(x2, codebook.detach(), num_samples, temperature, seed)
    # Mean of the S drawn rows without materialising [N, S, D].
    mean_code = F.embedding_bag(indices, codebook.detach(), mode="mean").reshape(x.shape)
    return VQSampleOutput(
        _straight_through(x, mean_code),
        indices.reshape(*x.shape[:-1], num_samples),
        _commitment(x, mean_code, weight),
    )
