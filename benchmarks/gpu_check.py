"""One command for the first CUDA machine: the kernel tests on CUDA tensors, then every op's benchmark
against its PyTorch reference and peer (time and peak memory), written to one CSV and a markdown
summary.

    python -m benchmarks.gpu_check [--out DIR] [--skip-tests] [--skip-bench] [--only NAME] [--dry]

1. ``pytest`` on the kernel test files (``KERNEL_TESTS``), one process per file, concurrently (their
   time is mostly Triton compiling), with ``TRITON_INTERPRET=0``: the tests then run the Triton
   backend on CUDA tensors (``python_tests/helpers.py`` picks the device: CUDA when the kernels are
   not interpreted and CUDA is available). Logs and JUnit XML per file go to ``DIR/logs/``.
2. Every op benchmark module (``benchmarks/bench_<op>.py``, found as ``benchmarks.run`` finds them;
   ``bench_patch``, a CPU model-level benchmark, is left to ``make bench``): its cases grouped and
   timed as ``benchmarks.run`` does (``common.time_interleaved``: ``triton.testing.do_bench`` on CUDA),
   plus the peak memory of one call of every case (``common.peak_memory_bytes``).
3. ``DIR/gpu_check.csv`` (the benchmark CSV columns of ``common.FIELDS``) and ``DIR/gpu_check.md``
   (device, versions, test counts per file, a table of the benchmarks with ratios to ours).

Default ``DIR``: ``benchmarks/results/gpu/``. Exit status 0 when the tests pass and every benchmark
ran, 1 otherwise, 2 without CUDA (nothing is run). Sized for under 8 minutes on one GPU: the tests
are stopped after ``TEST_TIMEOUT_S``, the benchmarks take ``--repeats`` (default 5) ``do_bench``
medians per case.

``--dry`` runs without a GPU, through the same code: the pytest command is only collected
(``--collect-only``, under ``TRITON_INTERPRET=0``) and every benchmark case is built in quick mode and
called on CPU tensors once for its time and once for its memory; the results go to a temporary
directory unless ``--out`` is given. CI runs it (``python_tests/test_tools.py``).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "gpu"
KERNEL_TESTS = (
    "python_tests/test_gated_prefix_attention.py",
    "python_tests/test_phm_linear.py",
    "python_tests/test_prompt_pool.py",
    "python_tests/test_vq.py",
)
BENCH_MODULES = ("bench_gated_prefix_attention", "bench_phm_linear", "bench_prompt_pool", "bench_vq")
TEST_TIMEOUT_S = 330


def pytest_command(test_files: list[str], junit: Path, dry: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", *test_files, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    return [*cmd, "--collect-only"] if dry else [*cmd, "-rfE"]


def run_tests(out: Path, dry: bool) -> dict:
    """Run the kernel test files without the interpreter, one pytest process per file, concurrently
    (their time is mostly Triton compiling, on the CPU), or, dry, collect them; counts per file."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # conftest only sets it when unset: the real kernels, on CUDA
    t0 = time.perf_counter()
    procs = []
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # one process per file on the GPU machine; dry, one process collects them all (fewer imports)
    for files in [list(KERNEL_TESTS)] if dry else [[f] for f in KERNEL_TESTS]:
        f = files[0] if len(files) == 1 else "kernel_tests"
        junit = logs / f"junit_{Path(f).stem}.xml"
        log = open(logs / f"pytest_{Path(f).stem}.log", "w")
        cmd = pytest_command(files, junit, dry)
        procs.append(
            (f, junit, log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        )
    rc, tails, files, collected = 0, [], {}, 0
    for f, junit, log, proc in procs:
        try:
            code = proc.wait(timeout=max(1.0, TEST_TIMEOUT_S - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = 124
        log.close()
        text = Path(log.name).read_text()
        if code != 0:
            rc = rc or code
            tails.append(
                f"== {f}: exit {code}" + (f" (timed out after {TEST_TIMEOUT_S} s)" if code == 124 else "")
            )
            tails += text.splitlines()[-15:]
        if dry:
            collected += sum(1 for line in text.splitlines() if "::" in line)
        elif junit.exists():
            files.update(_junit_counts(junit))
    return {
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "tail": "\n".join(tails),
        "files": files,
        "collected": collected,
    }


def _junit_counts(path: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("classname", "?").split(".")[-1]
        kind = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            kind = "failed"
        elif case.find("skipped") is not None:
            kind = "skipped"
        counts[name][kind] += 1
    return dict(counts)


def run_benchmarks(quick: bool, repeats: int, warmup: int, only: str | None, log=print) -> tuple[list, list]:
    """Every op benchmark's cases, timed and measured as ``benchmarks.run`` does; (rows, errors)."""
    from benchmarks.common import peak_memory_bytes, percentiles, row, time_interleaved
    from benchmarks.run import discover

    rows, errors = [], []
    for mod in discover(only):
        name = mod.__name__.rsplit(".", 1)[-1]
        if name not in BENCH_MODULES:
            continue
        try:
            groups = defaultdict(list)
            for case in mod.cases(quick):
                groups[(case.kernel, case.mode, case.size)].append(case)
            for (kernel, mode, size), cases in groups.items():
                times = time_interleaved(cases, repeats, warmup=warmup, collect=False)
                for i, c in enumerate(cases):
                    p50, p20, p80 = percentiles(times[i])
                    rows.append(row(c, "time", p50, p20, p80, "ms"))
                    m = float(peak_memory_bytes(c.fn))
                    rows.append(row(c, "peak_memory", m, m, m, "bytes"))
                log(f"{kernel:>24} {mode:<17} {size:<30} " + ", ".join(
                    f"{r['provider']} {float(r['p50']):.3f} ms" for r in rows[-2 * len(cases):] if r["metric"] == "time"
                ))  # fmt: skip
        except Exception as e:  # one broken module does not hide the others
            errors.append(f"{name}: {type(e).__name__}: {e}")
            log(f"{name}: ERROR {type(e).__name__}: {e}")
    return rows, errors


def write_csv(rows: list[dict], path: Path) -> None:
    from benchmarks.common import FIELDS

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def summary_markdown(
    device: str, tests: dict | None, rows: list[dict], errors: list[str], dry: bool, seconds: float
) -> str:
    import torch
    import triton

    lines = [
        f"# gpu_check{' (dry run on CPU)' if dry else ''}",
        "",
        f"- device: {device}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}, total {seconds:.0f} s",
        "",
        "## Kernel tests (TRITON_INTERPRET=0)",
        "",
    ]
    if tests is None:
        lines.append("skipped (--skip-tests)")
    elif dry:
        lines.append(f"collected {tests.get('collected', 0)} tests (exit {tests['rc']}); not run (dry)")
    else:
        lines += ["| file | passed | failed | skipped |", "|---|---|---|---|"]
        for name, c in sorted(tests["files"].items()):
            lines.append(f"| {name} | {c['passed']} | {c['failed']} | {c['skipped']} |")
        lines.append("")
        lines.append(f"pytest exit {tests['rc']} in {tests['seconds']:.0f} s")
        if tests["rc"] != 0:
            lines += ["", "```", tests["tail"], "```"]
    lines += ["", "## Benchmarks (median ms; peak extra memory of one call)", ""]
    by_group: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_group[(r["kernel"], r["mode"], r["size"])].setdefault(r["provider"], {})[r["metric"]] = float(
            r["p50"]
        )
    lines += [
        "| kernel | mode | size | provider | ms | x ours | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kernel, mode, size), provs in by_group.items():
        ours = provs.get("prompt_kernels", {}).get("time")
        for prov, m in provs.items():
            ms = m.get("time")
            ratio = f"{ms / ours:.2f}" if ours and ms is not None and prov != "prompt_kernels" else "–"
            mem = _fmt_bytes(m["peak_memory"]) if "peak_memory" in m else "–"
            lines.append(f"| {kernel} | {mode} | {size} | {prov} | {ms:.3f} | {ratio} | {mem} |")
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default {OUT_DIR.relative_to(ROOT)})"
    )
    p.add_argument(
        "--dry", action="store_true", help="no GPU: collect the tests, run each benchmark case once on CPU"
    )
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--only", default=None, help="only benchmark modules whose name contains this")
    p.add_argument("--repeats", type=int, default=5, help="timings per case (each a do_bench median on CUDA)")
    args = p.parse_args(argv)

    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing run. "
              "Use --dry to exercise the same code on CPU.")  # fmt: skip
        return 2
    if args.dry and os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: --dry runs the real (not interpreted) kernels' code path: unset TRITON_INTERPRET")
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry else OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()}, dry)"
    )
    t0 = time.perf_counter()
    print(f"gpu_check: {device}; results in {out}", flush=True)

    tests = None
    if not args.skip_tests:
        tests = run_tests(out, args.dry)
        print(f"kernel tests: exit {tests['rc']} in {tests['seconds']:.0f} s", flush=True)
        if tests["rc"] != 0:
            print(tests["tail"])
    rows, errors = [], []
    if not args.skip_bench:
        if args.dry:
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        # dry: quick sizes, one timed call after none for warm-up; CUDA: full sizes, do_bench medians
        rows, errors = run_benchmarks(
            quick=args.dry, repeats=1 if args.dry else args.repeats, warmup=0, only=args.only,
            log=lambda s: print(s, flush=True),
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    write_csv(rows, out / "gpu_check.csv")
    (out / "gpu_check.md").write_text(summary_markdown(device, tests, rows, errors, args.dry, seconds))
    print(f"wrote {out / 'gpu_check.csv'} ({len(rows)} rows) and {out / 'gpu_check.md'} in {seconds:.0f} s")
    tests_ok = tests is None or tests["rc"] == 0
    return 0 if tests_ok and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
