"""prompt_pool benchmarks: x [32, 128, 768] -> 16 prompt rows, with an int64 right-padding mask
(Hugging Face style, 64 to 128 real tokens per row) and without a mask.

Providers: ``prompt_kernels`` (the default backend: C++ on CPU, Triton on CUDA), ``torch_reference``
(the plain-PyTorch specification), ``x.sum(dim=1)`` (one read of x: the bandwidth floor of the forward;
forward+backward it also writes the gradient of x, the floor of the backward) and, without a mask,
``nn.AdaptiveAvgPool1d`` on the transposed view (what PyTorch offers when there is no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import Case
from prompt_kernels.ops import prompt_pool
from prompt_kernels.ops.reference import prompt_pool as reference

KERNEL = "prompt_pool"


def _inputs(B, T, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen).to(device=device, dtype=dtype)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long().to(device)
    return x, mask


def _forward_cases(B, T, D, L, dtype, device, with_mask: bool) -> list[Case]:
    x, mask = _inputs(B, T, D, dtype, device)
    mask = mask if with_mask else None
    tag = "" if dtype == torch.float32 else f" {str(dtype).replace('torch.', '')}"
    size = f"x[{B},{T},{D}]->{L} {'pad mask' if with_mask else 'no mask'}{tag}"
    cases = [
        Case(KERNEL, "prompt_kernels", "forward", size, lambda: prompt_pool(x, mask, L), measure_memory=True),
        Case(KERNEL, "torch_reference", "forward", size, lambda: reference(x, mask, L), measure_memory=True),
        Case(KERNEL, "x.sum(dim=1)", "forward", size, lambda: x.sum(dim=1)),
    ]
    if not with_mask:
        cases.append(
            Case(
                KERNEL,
                "nn.AdaptiveAvgPool1d",
                "forward",
                size,
                lambda: F.adaptive_avg_pool1d(x.transpose(1, 2), L),
            )
        )
    return cases


def _train_cases(B, T, D, L, dtype, device) -> list[Case]:
    x0, mask = _inputs(B, T, D, dtype, device)
    x = x0.clone().requires_grad_()
    grad_out = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    size = f"x[{B},{T},{D}]->{L} pad mask"

    def run(fn):
        def step():
            x.grad = None
            fn().backward(grad_out)

        return step

    def sum_floor():
        # Read x, write a full gradient of x (AccumulateGrad materialises the expanded grad).
        x.grad = None
        x.sum(dim=1).backward(grad_out[:, 0])

    return [
        Case(KERNEL, "prompt_kernels", "forward+backward", size, run(lambda: prompt_pool(x, mask, L))),
        Case(KERNEL, "torch_reference", "forward+backward", size, run(lambda: reference(x, mask, L))),
        Case(KERNEL, "x.sum(dim=1)", "forward+backward", size, sum_floor),
    ]


def cases(quick: bool) -> list[Case]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, D, L = 32, 128, 768, 16
    out = _forward_cases(B, T, D, L, torch.float32, device, with_mask=True)
    out += _forward_cases(B, T, D, L, torch.float32, device, with_mask=False)
    out += _train_cases(B, T, D, L, torch.float32, device)
    if not quick:
        out += _forward_cases(B, T, D, L, torch.bfloat16, device, with_mask=True)
    return out
