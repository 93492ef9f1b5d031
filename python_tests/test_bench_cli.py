"""`prompt-kernels bench --quick` writes its CSV rows and one PNG plot per op beside the CSV (one small module)."""

from __future__ import annotations

import csv

from benchmarks import run


def test_bench_quick_writes_csv_and_plots(tmp_path):
    out = tmp_path / "results.csv"
    assert run.main(["--quick", "--only", "prompt_pool", "--csv", str(out), "--repeats", "2"]) == 0
    rows = list(csv.DictReader(open(out)))
    providers = {r["provider"] for r in rows if r["metric"] == "time"}
    assert {"prompt_kernels", "torch_reference", "x.sum(dim=1)"} <= providers
    assert all(float(r["p50"]) > 0 and r["machine"] for r in rows)
    png = tmp_path / "prompt_pool.png"
    assert png.exists() and png.stat().st_size > 1000


def test_cuda_timing_uses_do_bench_round_robin(monkeypatch):
    """On CUDA every timing comes from triton.testing.do_bench (median mode), cases interleaved."""
    import triton.testing

    from benchmarks.common import Case, _time_interleaved_cuda

    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"
        fn()
        return float(len(calls))

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    cases = [Case("k", p, "forward", "s", lambda p=p: calls.append(p)) for p in ("a", "b")]
    times = _time_interleaved_cuda(cases, repeats=3)
    assert calls == ["a", "b"] * 3
    assert times == {0: [1.0, 3.0, 5.0], 1: [2.0, 4.0, 6.0]}  # each call counted before it returns


def test_op_benchmarks_run_under_pytest_benchmark(tmp_path):
    """``pytest benchmarks/ --benchmark-only``: the op cases of benchmarks.run, providers side by side."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_op_benchmarks.py", "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", "prompt_pool and forward-", "--benchmark-only", "--benchmark-max-time=0.01"]
    cmd += ["--benchmark-min-rounds=1", f"--benchmark-json={out}"]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    groups = {}
    for b in json.loads(out.read_text())["benchmarks"]:
        groups.setdefault(b["group"], set()).add(b["extra_info"]["provider"])
    assert groups and all({"prompt_kernels", "torch_reference"} <= providers for providers in groups.values())
