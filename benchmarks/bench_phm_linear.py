"""phm_linear benchmarks: the GPC generator's down projection x [2048, 384] -> 64 with n = 4 (and, not
quick, the up projection 64 -> 384 and bf16), forward and forward+backward (gradients of x, rules,
weights and bias).

Providers: ``prompt_kernels`` (the default backend: C++ on CPU, Triton on CUDA), ``torch_reference``
(the plain-PyTorch specification: a loop of ``torch.kron``, then matmul), ``compacter`` (the
materialised formula of the Compacter/PHM papers' code: a batched Kronecker product by einsum summed
over ``i``, ``x @ H + b``, with autograd) and ``nn.Linear`` (a dense layer of the same shape: the
speed a PHM layer would like to match).
"""

from __future__ import annotations

import torch

from benchmarks.common import Case
from prompt_kernels.ops import phm_linear
from prompt_kernels.ops.reference import phm_linear as reference

KERNEL = "phm_linear"


def compacter(x, rules, weights, bias):
    """``x @ sum_i kron(A_i, B_i) + b`` as the Compacter code writes it (batched kron by einsum)."""
    n, ib, ob = weights.shape
    kron = torch.einsum("iab,ipq->iapbq", rules, weights).reshape(n, n * ib, n * ob)
    return torch.matmul(x, kron.sum(0)) + bias


def _inputs(rows, in_features, out_features, n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    rules = torch.randn(n, n, n, generator=gen)
    weights = torch.randn(n, in_features // n, out_features // n, generator=gen) / in_features**0.5
    bias = torch.randn(out_features, generator=gen)
    grad_out = torch.randn(rows, out_features, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, rules, weights, bias, grad_out)]


def _cases(rows, in_features, out_features, n, dtype, device) -> list[Case]:
    x, rules, weights, bias, grad_out = _inputs(rows, in_features, out_features, n, dtype, device)
    dense = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
    tag = "" if dtype == torch.float32 else f" {str(dtype).replace('torch.', '')}"
    size = f"x[{rows},{in_features}]->{out_features} n={n}{tag}"
    params = [t.clone().requires_grad_() for t in (x, rules, weights, bias)]
    dense_x = x.clone().requires_grad_()

    providers = {
        "prompt_kernels": lambda: phm_linear(*params),
        "torch_reference": lambda: reference(*params),
        "compacter": lambda: compacter(*params),
        "nn.Linear": lambda: dense(dense_x),
    }

    def forward(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    def train(fn):
        def call():
            for t in (*params, dense_x, *dense.parameters()):
                t.grad = None
            fn().backward(grad_out)

        return call

    out = [Case(KERNEL, name, "forward", size, forward(fn)) for name, fn in providers.items()]
    out += [Case(KERNEL, name, "forward+backward", size, train(fn)) for name, fn in providers.items()]
    return out


def cases(quick: bool) -> list[Case]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = _cases(2048, 384, 64, 4, torch.float32, device)
    if not quick:
        out += _cases(2048, 64, 384, 4, torch.float32, device)
        out += _cases(2048, 384, 64, 4, torch.bfloat16, device)
    return out
