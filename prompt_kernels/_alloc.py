"""Output allocation for the kernels' launchers.

Every Triton and C++ launcher allocates its outputs here. With ``PROMPT_KERNELS_POISON=1`` (set by
the test suite) new float outputs are filled with NaN and integer outputs with a sentinel, so a
kernel that forgets to write an element fails the tests instead of passing on leftover memory.
"""

from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("PROMPT_KERNELS_POISON") == "1"


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min if dtype != torch.bool else True)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)
