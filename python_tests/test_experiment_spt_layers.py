"""``benchmarks.experiment_spt_layers --report-only``: the report from stored runs (no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks import experiment_spt_layers

STORED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "experiment_spt_layers.json"


def test_report_from_stored_runs(tmp_path):
    runs = tmp_path / "runs.json"
    shutil.copy(STORED, runs)
    out = tmp_path / "report.md"
    experiment_spt_layers.main(
        ["--report-only", "--json", str(runs), "--out", str(out), "--seeds", "0", "1", "2"]
    )
    text = out.read_text()
    by = {(r["seed"], tuple(r["layers"])): r["accuracy"] for r in json.loads(runs.read_text())["runs"]}
    # seed 1, layer 5: acc(all) - acc(without 5), as the report prints it
    imp = by[(1, (0, 1, 2, 3, 4, 5))] - by[(1, (0, 1, 2, 3, 4))]
    assert f"+{imp:.3f}" in text
    assert "Per-seed top-4 by importance" in text and "seed 1: [1, 3, 4, 5]" in text
