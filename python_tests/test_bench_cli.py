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
