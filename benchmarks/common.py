"""Shared benchmark machinery: timing, memory, the CSV all benchmarks append to, the machine's name.

A benchmark module ``benchmarks/bench_<op>.py`` defines ``cases(quick: bool) -> list[Case]``. Cases
that share ``kernel``, ``mode`` and ``size`` are one comparison: ``run.py`` times their providers
interleaved (round-robin over repeats) in one process, so the ratios between them are side by side.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "results.csv"
FIELDS = ["kernel", "provider", "mode", "metric", "size", "p50", "p20", "p80", "unit", "machine", "timestamp"]


@dataclass
class Case:
    kernel: str  # e.g. "phm_linear"
    provider: str  # e.g. "prompt_kernels", "torch_reference", "nn.Linear", "peft"
    mode: str  # "forward", "forward+backward", "step", ...
    size: str  # a short description of the shape, e.g. "x[2048,384]->64 n=4"
    fn: Callable[[], object]  # one timed call; must do the whole work (no lazy results)
    setup: Callable[[], None] | None = None  # run once before timing (e.g. zero grads)
    extra: dict = field(default_factory=dict)  # optional extra columns for notes (not written)
    measure_memory: bool = False  # also record peak extra CPU memory of one call (bytes)


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(
    cases: list[Case], repeats: int, warmup: int = 2, collect: bool = True
) -> dict[int, list[float]]:
    """Time each case ``repeats`` times, round-robin, after ``warmup`` calls each. Returns ms per call.

    ``collect``: run the garbage collector before every timed call (the default: no collection lands
    inside a timing), or never (a plain training loop's conditions: memory freed by the previous call
    is reused warm, and collections fall where they fall).

    On CUDA each timing is ``triton.testing.do_bench`` of the case (its median over its own repeats,
    with the L2 cache flushed between calls), still round-robin over the cases."""
    if torch.cuda.is_available():
        return _time_interleaved_cuda(cases, repeats)
    for c in cases:
        if c.setup:
            c.setup()
        for _ in range(warmup):
            c.fn()
    _sync()
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(repeats):
        for i, c in enumerate(cases):
            if collect:
                gc.collect()
            _sync()
            t0 = time.perf_counter()
            c.fn()
            _sync()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def _time_interleaved_cuda(cases: list[Case], repeats: int) -> dict[int, list[float]]:
    from triton.testing import do_bench

    for c in cases:
        if c.setup:
            c.setup()
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(repeats):
        for i, c in enumerate(cases):
            times[i].append(float(do_bench(c.fn, warmup=5, rep=20, return_mode="median")))
    return times


def cpu_time_interleaved(cases: list[Case], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each case's median wall and process CPU time in seconds, keyed by provider, over ``repeats``
    round-robin passes (after the caller's warm-up). On one thread, a step's CPU time hardly depends on
    how busy the rest of the machine is."""
    wall: dict[str, list[float]] = {c.provider: [] for c in cases}
    cpu: dict[str, list[float]] = {c.provider: [] for c in cases}
    for _ in range(repeats):
        for c in cases:
            w0, c0 = time.perf_counter(), time.process_time()
            c.fn()
            wall[c.provider].append(time.perf_counter() - w0)
            cpu[c.provider].append(time.process_time() - c0)
    med = statistics.median
    return {p: med(v) for p, v in wall.items()}, {p: med(v) for p, v in cpu.items()}


def percentiles(xs: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return statistics.median(xs), qs[1], qs[7]


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak extra memory of one call: CUDA allocator peak on GPU, else the CPU allocator's peak as
    seen by torch's profiler (sum of live tensor bytes allocated during the call).

    On CPU every allocation and free the profiler records (one event each, with its size) is
    replayed in time order and the running sum's maximum is returned, so temporaries freed inside
    an op count too. Allocations made by intra-op worker threads are not reported to the profiler.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = _cpu_allocation_peak(prof)
    if peak is not None:
        return peak
    # Fallback (private profiler API unavailable): leaf events' memory, which misses the
    # allocations of ops that have child ops.
    live = peak = 0
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0) != 0 and not e.cpu_children),
        key=lambda e: e.time_range.start,
    )
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def _cpu_allocation_peak(prof) -> int | None:
    """Peak of the running sum of the CPU allocation events (+size on alloc, -size on free) the
    profiler recorded, in time order; None if the event tree is not available."""
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError):
        return None
    events = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def append_rows(rows: list[dict], path: Path = CSV_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def row(case: Case, metric: str, p50: float, p20: float, p80: float, unit: str) -> dict:
    return {
        "kernel": case.kernel,
        "provider": case.provider,
        "mode": case.mode,
        "metric": metric,
        "size": case.size,
        "p50": f"{p50:.6g}",
        "p20": f"{p20:.6g}",
        "p80": f"{p80:.6g}",
        "unit": unit,
        "machine": machine_name(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
