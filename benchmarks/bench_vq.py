"""Vector-quantiser benchmarks: x [N, 384] against a codebook [1000, 384], N = 3,200 and 32,000
(--quick: N = 3,200 only), float32, time and peak extra memory.

Providers:
* ``prompt_kernels``: ``ops.vq_nearest`` / ``ops.vq_quantize`` on the default backend (C++ on CPU,
  Triton on CUDA): one tiled pass, no N x K matrix.
* ``torch_reference``: the plain-PyTorch specification (full distance matrix, argmin).
* ``x @ codebook.T``: the products alone (one GEMM, materialising ``N x K``): the compute floor
  every provider pays (``vq_nearest`` group only).
* ``vector-quantize-pytorch``: ``VectorQuantize(dim=384, codebook_size=1000)`` in eval mode (no EMA
  update, no loss: eval computes the distance matrix with its own ``cdist`` (``sqrt`` of the expanded
  form), arg-max of the negated distances and the gathered codes). Its forward is the same in both
  comparisons: in the ``vq_nearest`` group it also gathers the codes (``N x D``), in the
  ``vq_quantize`` group it skips the commitment loss that ours computes.
"""

from __future__ import annotations

import torch

from benchmarks.common import Case
from prompt_kernels.ops import vq_nearest, vq_quantize
from prompt_kernels.ops.reference import vq_nearest as nearest_reference
from prompt_kernels.ops.reference import vq_quantize as quantize_reference

K, D = 1000, 384
SIZES = (3_200, 32_000)


def _peer(codebook: torch.Tensor):
    """vector-quantize-pytorch's VectorQuantize in eval mode with our codebook, or None if missing."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    vq = VectorQuantize(dim=D, codebook_size=K).to(codebook.device).eval()
    vq._codebook.embed.copy_(codebook[None])
    return vq


def _cases_for(N: int, device: str) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen).to(device)
    codebook = torch.randn(K, D, generator=gen).to(device)
    size = f"x[{N},{D}] K={K}"
    peer = _peer(codebook)
    out = []
    for kernel, ours, ref in (
        ("vq_nearest", vq_nearest, nearest_reference),
        ("vq_quantize", vq_quantize, quantize_reference),
    ):
        out += [
            Case(
                kernel, "prompt_kernels", "forward", size, lambda f=ours: f(x, codebook), measure_memory=True
            ),
            Case(
                kernel, "torch_reference", "forward", size, lambda f=ref: f(x, codebook), measure_memory=True
            ),
        ]
        if kernel == "vq_nearest":
            out.append(Case(kernel, "x @ codebook.T", "forward", size, lambda: x @ codebook.T))
        if peer is not None:
            out.append(
                Case(
                    kernel,
                    "vector-quantize-pytorch",
                    "forward",
                    size,
                    lambda: peer(x[None]),
                    measure_memory=True,
                )
            )
    return out


def cases(quick: bool) -> list[Case]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for N in SIZES[:1] if quick else SIZES:
        out += _cases_for(N, device)
    return out
