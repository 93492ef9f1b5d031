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


def cpu_time_table(repeats: int = 300, threads: int = 1) -> str:
    """Process CPU time per call (p25 and median over interleaved repeats), a cross-check that holds on
    a shared machine where wall-clock times with 2 threads mostly measure waits for a free core. Like
    the runner, it collects garbage before every timed call (so a provider's own allocations do not
    bill the next one for a collection)."""
    import gc
    import statistics
    import time

    torch.set_num_threads(threads)
    groups: dict[tuple[str, str], list[Case]] = {}
    for c in cases(quick=False):
        groups.setdefault((c.mode, c.size), []).append(c)
    lines = [
        f"process CPU time per call, {threads} thread(s), {repeats} interleaved repeats (p25 / median, ms)"
    ]
    for (mode, size), group in groups.items():
        times: dict[str, list[float]] = {c.provider: [] for c in group}
        for c in group:
            c.fn()
            c.fn()
        for _ in range(repeats):
            for c in group:
                gc.collect()  # as benchmarks.common.time_interleaved does before every timed call
                t0 = time.process_time()
                c.fn()
                times[c.provider].append((time.process_time() - t0) * 1e3)
        p25 = {k: sorted(v)[len(v) // 4] for k, v in times.items()}
        ours = p25["prompt_kernels"]
        cells = ", ".join(
            f"{k} {p25[k]:.3f} / {statistics.median(v):.3f}"
            + ("" if k == "prompt_kernels" else f" ({p25[k] / ours:.2f}x ours)")
            for k, v in times.items()
        )
        lines.append(f"{mode:<17} {size:<30} {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="phm_linear CPU-time cross-check (see cpu_time_table)")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(cpu_time_table(args.repeats, args.threads))
