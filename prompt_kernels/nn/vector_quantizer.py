"""A vector quantiser whose codebook is a buffer updated by exponential moving averages.

    x: [..., dim]  ->  VQOutput(quantized [..., dim], indices [...], loss [])              mode="nearest"
                       VQSampleOutput(quantized [..., dim], indices [..., S], loss [])     mode="sample"

The forward pass is ``ops.vq_quantize`` (nearest code) or ``ops.vq_sample`` (``S`` draws from
``softmax(-||x - e||^2 / temperature)``, mean code), straight-through with the commitment loss; in
training mode it then updates the codebook (no gradient reaches it). With the batch's code counts
``c_k`` (over all rows and samples, ``S = 1`` for nearest) and assigned sums
``m_k = (sum of the rows that drew k, counted with multiplicity) / S``:

``ema="vip"`` (VIP, Bhardwaj et al. 2022, as in METHODS.md and the authors' code)::

    N_k <- γ N_k + (1 - γ) c_k / S
    N_k <- (N_k + ε) / (sum N + K ε) * sum N          (Laplace smoothing, stored)
    e_k <- γ e_k + (1 - γ) m_k / N_k

    initially N_k = 1 / K. A code drawn by no row decays towards 0 (γ e_k).

``ema="vqvae"`` (van den Oord et al. 2017; the running sums of vector-quantize-pytorch)::

    N_k <- γ N_k + (1 - γ) c_k / S,   M_k <- γ M_k + (1 - γ) m_k
    e_k <- M_k / Ñ_k,   Ñ = (N + ε) / (sum N + K ε) * sum N      (smoothing for the division only)

    initially N_k = 1 and M = codebook, so e = M / N holds from the start.

``dead_code_threshold > 0``: after each update, codes whose count ``N_k`` is below it are replaced by
random rows of the batch, with ``N_k`` set to the threshold (and ``M_k = threshold * row``).

The buffers are float32 (whatever x's dtype); x is quantised against the codebook cast to x's dtype.
Under DistributedDataParallel (``broadcast_buffers=True``, the default) every step starts from rank
0's codebook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prompt_kernels.ops.vq import VQOutput, VQSampleOutput, vq_quantize, vq_sample

MODES = ("nearest", "sample")
EMA_KINDS = ("vip", "vqvae")
DEFAULT_COMMITMENT = {"nearest": 0.25, "sample": 0.1}


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _real(
    name: str, v, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False
) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return float(v)


def initial_codebook(
    dim: int,
    codebook_size: int,
    init_rows: torch.Tensor | None = None,
    l2_normalize: bool = False,
    scale: float | None = None,
    device=None,
) -> torch.Tensor:
    """``[codebook_size, dim]`` float32: randomly chosen rows of ``init_rows`` (without replacement
    when there are enough; all-zero rows are skipped when normalising) or a standard normal draw;
    then optionally L2-normalised and rescaled to norm ``scale`` (``scale`` implies normalising)."""
    normalise = l2_normalize or scale is not None
    if init_rows is None:
        codes = torch.randn(codebook_size, dim, device=device)
    else:
        rows = init_rows.detach().float()
        if normalise:
            nonzero = rows.norm(dim=-1) > 0
            rows = rows[nonzero] if nonzero.any() else rows
        n = rows.shape[0]
        pick = (
            torch.randperm(n)[:codebook_size] if n >= codebook_size else torch.randint(0, n, (codebook_size,))
        )
        codes = rows[pick.to(rows.device)].clone()
        codes = codes if device is None else codes.to(device)
    if normalise:
        codes = F.normalize(codes, dim=-1) * (1.0 if scale is None else scale)
    return codes.contiguous()


class VectorQuantizer(nn.Module):
    """Vector quantiser with an EMA-updated codebook (see the module docstring).

    Args:
        dim: feature size ``D`` of x and of the codes.
        codebook_size: number of codes ``K``.
        mode: ``"nearest"`` (``ops.vq_quantize``) or ``"sample"`` (``ops.vq_sample``, VIP).
        num_samples, temperature: draws per row and softmax temperature of ``"sample"``.
        commitment_weight: weight of the commitment loss (default 0.25 for nearest, 0.1 for sample).
        ema: ``"vip"`` or ``"vqvae"`` codebook update.
        decay: EMA decay ``γ`` in [0, 1). eps: Laplace smoothing ``ε >= 0``.
        dead_code_threshold: reset codes whose EMA count falls below it (0 = off).
        init_rows: ``[R, dim]`` rows to draw the initial codes from (e.g. vocabulary embeddings).
        l2_normalize_init, init_scale: normalise the initial codes, rescale them to norm ``init_scale``
            (VIP: 100).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        mode: str = "nearest",
        num_samples: int = 10,
        temperature: float = 100.0,
        commitment_weight: float | None = None,
        ema: str = "vip",
        decay: float = 0.99,
        eps: float = 0.01,
        dead_code_threshold: float = 0.0,
        init_rows: torch.Tensor | None = None,
        l2_normalize_init: bool = False,
        init_scale: float | None = None,
        device=None,
    ):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.codebook_size = _positive_int("codebook_size", codebook_size)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ema not in EMA_KINDS:
            raise ValueError(f"ema must be one of {EMA_KINDS}, got {ema!r}")
        self.mode, self.ema = mode, ema
        self.num_samples = _positive_int("num_samples", num_samples)
        self.temperature = _real("temperature", temperature, lo=0.0, lo_open=True)
        cw = DEFAULT_COMMITMENT[mode] if commitment_weight is None else commitment_weight
        self.commitment_weight = _real("commitment_weight", cw)
        self.decay = _real("decay", decay, lo=0.0, hi=1.0, hi_open=True)
        self.eps = _real("eps", eps, lo=0.0)
        self.dead_code_threshold = _real("dead_code_threshold", dead_code_threshold, lo=0.0)
        if init_rows is not None:
            if not isinstance(init_rows, torch.Tensor) or not init_rows.is_floating_point():
                raise TypeError(
                    f"init_rows must be a floating-point torch.Tensor or None, got {type(init_rows).__name__}"
                )
            if init_rows.dim() != 2 or init_rows.shape[1] != dim or init_rows.shape[0] < 1:
                raise ValueError(
                    f"init_rows must have shape [R >= 1, dim={dim}], got {tuple(init_rows.shape)}"
                )
        if init_scale is not None:
            init_scale = _real("init_scale", init_scale, lo=0.0, lo_open=True)
        codes = initial_codebook(dim, codebook_size, init_rows, l2_normalize_init, init_scale, device)
        K = codebook_size
        self.register_buffer("codebook", codes)
        if ema == "vip":
            self.register_buffer("cluster_size", torch.full((K,), 1.0 / K, device=codes.device))
        else:
            self.register_buffer("cluster_size", torch.ones(K, device=codes.device))
            self.register_buffer("embed_sum", codes.clone())

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, codebook_size={self.codebook_size}, mode={self.mode!r}"
        if self.mode == "sample":
            s += f", num_samples={self.num_samples}, temperature={self.temperature}"
        s += f", commitment_weight={self.commitment_weight}, ema={self.ema!r}, decay={self.decay}, eps={self.eps}"
        if self.dead_code_threshold > 0:
            s += f", dead_code_threshold={self.dead_code_threshold}"
        return s

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, seed: torch.Tensor | None = None
    ) -> VQOutput | VQSampleOutput:
        """Quantise ``x [..., dim]``; in training mode, then update the codebook by EMA. ``generator`` or
        ``seed`` (see ``ops.vq.vq_sample``) only matter in sample mode."""
        codebook = self.codebook.to(x.dtype) if isinstance(x, torch.Tensor) else self.codebook
        if self.mode == "nearest":
            out = vq_quantize(x, codebook, commitment_weight=self.commitment_weight)
        else:
            out = vq_sample(
                x,
                codebook,
                self.num_samples,
                self.temperature,
                generator=generator,
                commitment_weight=self.commitment_weight,
                seed=seed,
            )
        if self.training:
            self.update(x, out.indices)
        return out

    @torch.no_grad()
    def update(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step from rows ``x [..., dim]`` and the codes they drew, ``indices [...]`` (nearest)
        or ``[..., S]`` (sample)."""
        K, D, g = self.codebook_size, self.dim, self.decay
        rows = x.detach().reshape(-1, D).to(self.codebook.dtype)
        drawn = indices.reshape(rows.shape[0], -1)
        S = drawn.shape[1]
        # draws[i, k] = how often row i drew code k / S; one GEMM gives every code's sum of rows
        # (no per-sample loop, no [N * S, D] copy of the rows).
        draws = torch.zeros(rows.shape[0], K, dtype=rows.dtype, device=rows.device)
        draws.scatter_add_(1, drawn, torch.full(drawn.shape, 1.0 / S, dtype=rows.dtype, device=rows.device))
        counts = draws.sum(0)
        sums = draws.t() @ rows
        self.cluster_size.mul_(g).add_(counts, alpha=1 - g)
        if self.ema == "vip":
            self.cluster_size.copy_(self._laplace(self.cluster_size))
            self.codebook.mul_(g).add_(sums / self.cluster_size[:, None], alpha=1 - g)
        else:
            self.embed_sum.mul_(g).add_(sums, alpha=1 - g)
            self.codebook.copy_(self.embed_sum / self._laplace(self.cluster_size)[:, None])
        if self.dead_code_threshold > 0 and rows.shape[0] > 0:
            self._reset_dead_codes(rows)

    def _laplace(self, n: torch.Tensor) -> torch.Tensor:
        total = n.sum()
        return (n + self.eps) / (total + self.codebook_size * self.eps) * total

    def _reset_dead_codes(self, rows: torch.Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold  # [K]
        replacement = rows[torch.randint(0, rows.shape[0], (self.codebook_size,), device=rows.device)]
        self.codebook.copy_(torch.where(dead[:, None], replacement, self.codebook))
        self.cluster_size.copy_(
            torch.where(dead, torch.full_like(self.cluster_size, self.dead_code_threshold), self.cluster_size)
        )
        if self.ema == "vqvae":
            self.embed_sum.copy_(
                torch.where(dead[:, None], replacement * self.dead_code_threshold, self.embed_sum)
            )
