"""``benchmarks.arch_sweep``: one row per model type with ours and PEFT's prefix tuning and prompt tuning,
and the summary's counts (run in-process on three types)."""

from __future__ import annotations

from patch_helpers import one_thread  # noqa: F401  (autouse fixture)

from benchmarks import arch_sweep


def test_rows_and_summary_record_each_method_per_type():
    rows = [
        arch_sweep.sweep_one("causal-lm", "llama"),
        arch_sweep.sweep_one("seq-cls", "deberta"),
        arch_sweep.sweep_one("seq-cls", "deberta-v2"),
    ]
    assert all(set(r) == set(arch_sweep.COLUMNS) for r in rows)
    llama, deberta, _ = rows
    assert [llama[c] for c in arch_sweep.CHECKS] == ["ok"] * 4
    # DeBERTa computes attention in its own code and takes no cache: only input-style prompts reach it.
    assert deberta["ours"] == "fail" and "cannot reach" in deberta["ours_reason"]
    assert deberta["ours_pt"] == "ok" and deberta["bare"] == "ok"
    md = arch_sweep.summary(rows, 1.0)
    assert "| causal-lm | 1 | 1 | 1 | 1 | 1 | 0 | 0 |" in md
    assert "| seq-cls | 2 | 2 | 0 |" in md
    assert "| seq-cls | 2 | 2 |" in md.split("Prompt tuning (4 vectors")[1]
    assert "- Neither (the tiny model runs) (2): deberta, deberta-v2" in md
