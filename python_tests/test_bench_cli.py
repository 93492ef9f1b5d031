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


def test_make_report_shows_before_tables_when_present(tmp_path):
    """benchmarks.make_report: the "before" copies of the roofline, launches and compile summary
    appear collapsed after the current tables, with before → now tables; without them no such part."""
    from benchmarks import make_report as mr

    roof = (
        "| case | programs | issued/floor B | unique/floor B | dot/floor flop | predicted H100 kernel µs |\n"
    )
    roof += "|---|---|---|---|---|---|\n| op_x bwd fp32 x[4] | {p} | {r} | 1.00x | – | 0.010 |\n"
    launches = (
        "| case | launches | programs | kernels |\n|---|---|---|---|\n| op_x bwd fp32 x[4] | {n} | 4 | _k |\n"
    )
    cc = "| kernel | arch | configs | regs | spill B | smem B | blocks/SM | MMA | async copies | result |\n"
    cc += "|---|---|---|---|---|---|---|---|---|---|\n| op_x_bwd fp16 | sm_90 | {c} | 40 | {s} | 0 | 8 | {m} | cp.async | ok |\n"
    (tmp_path / "roofline.md").write_text(roof.format(p=4, r="2.00x"))
    (tmp_path / "roofline_launches.md").write_text(launches.format(n=3))
    (tmp_path / "compile_summary.md").write_text(cc.format(c=6, s=0, m="HGMMA"))
    csv_path = tmp_path / "results.csv"  # absent: the measured part says so

    text = mr.build_report(tmp_path, csv_path, tmp_path)
    assert "| op_x bwd fp32 x[4] | 4 | 2.00x |" in text and "| op_x_bwd fp16 | sm_90 | 6 |" in text
    assert mr.BEFORE_TITLE not in text and "What changed" not in text and "<details>" in text  # launches only

    (tmp_path / "roofline_2026-12-04_before.md").write_text("_old_\n\n" + roof.format(p=8, r="3.00x"))
    (tmp_path / "roofline_launches_2026-12-04_before.md").write_text(launches.format(n=4))
    (tmp_path / "compile_summary_2026-12-04_before.md").write_text(cc.format(c=4, s="0-12", m="HGMMA/HMMA"))
    text = mr.build_report(tmp_path, csv_path, tmp_path)
    assert text.count(f"<summary>{mr.BEFORE_TITLE}") == 3
    assert text.index("| op_x bwd fp32 x[4] | 4 | 2.00x |") < text.index("| op_x bwd fp32 x[4] | 8 | 3.00x |")
    assert "| op_x bwd fp32 x[4] | 4 → 3 | 8 → 4 | 3.00x → 2.00x | 1.00x | – | 0.010 |" in text
    assert (
        "| op_x | bwd 4 → 3 | 4 → 6 | HGMMA/HMMA → HGMMA | op_x_bwd fp16 → none | 1/1 | 1 rows, max 12 B → none |"
        in text
    )

    for name in ("roofline.md", "roofline_launches.md", "compile_summary.md"):
        (tmp_path / name).unlink()
    assert "Run the roofline command" in mr.build_report(
        tmp_path, csv_path, tmp_path
    )  # before files alone: no error
