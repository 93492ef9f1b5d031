"""Run every benchmark module (``benchmarks/bench_*.py``), append rows to the CSV, print ratios.

python -m benchmarks.run [--quick] [--only NAME] [--csv PATH] [--repeats N] [--no-gc]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections import defaultdict
from pathlib import Path

import benchmarks
from benchmarks.common import (
    CSV_PATH,
    append_rows,
    machine_name,
    peak_memory_bytes,
    percentiles,
    row,
    time_interleaved,
)


def discover(only: str | None):
    for mod in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if mod.name.startswith("bench_") and (only is None or only in mod.name):
            yield importlib.import_module(f"benchmarks.{mod.name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--only", default=None, help="run only modules whose name contains this")
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--no-gc", action="store_true", help="no garbage collection before each timed call (a plain loop)"
    )
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    print(f"machine: {machine_name()}")
    for mod in discover(args.only):
        groups = defaultdict(list)
        for case in mod.cases(args.quick):
            groups[(case.kernel, case.mode, case.size)].append(case)
        for (kernel, mode, size), cases in groups.items():
            times = time_interleaved(cases, repeats, collect=not args.no_gc)
            rows, medians = [], {}
            for i, c in enumerate(cases):
                p50, p20, p80 = percentiles(times[i])
                medians[c.provider] = p50
                rows.append(row(c, "time", p50, p20, p80, "ms"))
                if c.measure_memory:
                    m = float(peak_memory_bytes(c.fn))
                    rows.append(row(c, "peak_memory", m, m, m, "bytes"))
            append_rows(rows, args.csv)
            base = medians.get("prompt_kernels")
            desc = ", ".join(
                f"{prov} {ms:.3f} ms"
                + (f" ({ms / base:.2f}x ours)" if base and prov != "prompt_kernels" else "")
                for prov, ms in medians.items()
            )
            print(f"{kernel:>24} {mode:<17} {size:<28} {desc}", flush=True)
    print(f"rows appended to {args.csv}")
    try:
        from benchmarks.plot import plot_all

        for path in plot_all(args.csv, args.csv.parent):
            print(f"plot: {path}")
    except ImportError as exc:  # matplotlib is optional
        print(f"plots skipped: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
