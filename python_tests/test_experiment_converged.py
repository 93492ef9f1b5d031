"""The converged-comparison runner's bookkeeping (benchmarks/experiment_converged.py) with a fake
training function: no model, no data; seconds."""

import csv

import pytest

from benchmarks import experiment_converged as ec


def fake_train(calls, fail_at=None):
    """A runner function that logs a made-up curve (accuracy rising with the step and the seed); with
    ``fail_at=(method, seed, step)`` it dies after logging that step of that method (a stopped process)."""

    def train(run, emit):
        calls.append((run["method"], run["seed"]))
        for step in range(0, run["steps"] + 1, 50):
            emit(
                {
                    "step": step,
                    "phase": "train" if step else "init",
                    "accuracy": round(0.5 + 0.001 * step + 0.01 * run["seed"], 4),
                    "eval_examples": 100,
                    "train_loss": "",
                    "train_seconds": 0.5 * step,
                    "trainable_parameters": 1000,
                    "batch_size": 16,
                    "max_length": 64,
                    "prompt_length": 10,
                    "train_rows": 64,
                    "machine": "test",
                    "date": "2026-12-04",
                }
            )
            if fail_at == (run["method"], run["seed"], step):
                raise KeyboardInterrupt

    return train


def runs(methods=("prompt-tuning", "vip"), seeds=(0, 1), steps=200):
    return ec.plan(["mr"], ["full"], list(methods), list(seeds), lambda m: [0.01], steps)


def test_plan_is_seed_major():
    order = [(r["seed"], r["method"]) for r in runs()]
    assert order == [(0, "prompt-tuning"), (0, "vip"), (1, "prompt-tuning"), (1, "vip")]


def test_resume_skips_finished_and_restarts_unfinished_cleanly(tmp_path):
    log = tmp_path / "curves.csv"
    calls = []
    with pytest.raises(KeyboardInterrupt):  # dies in seed 1's vip run after its step-100 row
        ec.execute(runs(), log, fake_train(calls, fail_at=("vip", 1, 100)), out=lambda s: None)
    assert calls == [("prompt-tuning", 0), ("vip", 0), ("prompt-tuning", 1), ("vip", 1)]
    rows = ec.read_log(log)
    assert len(rows) == 3 * 5 + 3  # three finished runs of 5 evaluations, 3 rows of the stopped one
    assert len(ec.finished_runs(rows)) == 3

    calls.clear()
    counts = ec.execute(runs(), log, fake_train(calls), out=lambda s: None)
    assert calls == [("vip", 1)]  # only the unfinished run trains again
    assert counts == {"skipped": 3, "restarted": 1, "done": 1}
    rows = ec.read_log(log)
    assert len(rows) == 4 * 5  # the stopped attempt's rows were dropped, not duplicated
    vip1 = [int(r["step"]) for r in rows if r["method"] == "vip" and r["seed"] == "1"]
    assert vip1 == [0, 50, 100, 150, 200]

    calls.clear()
    assert ec.execute(runs(), log, fake_train(calls), out=lambda s: None)["skipped"] == 4
    assert calls == []
    # a longer budget is another run (SPT's search length depends on it): trained from step 0
    ec.execute(runs(seeds=(0,), methods=("vip",), steps=300), log, fake_train(calls), out=lambda s: None)
    assert calls == [("vip", 0)]


def test_steps_to_95_percent_of_final():
    curve = [(0, 0.50), (50, 0.60), (100, 0.70), (150, 0.72), (200, 0.74)]
    assert ec.steps_to_fraction(curve) == 150  # 0.95 * 0.74 = 0.703: 0.70 is short of it
    assert ec.steps_to_fraction(list(reversed(curve))) == 150  # order does not matter
    assert ec.steps_to_fraction([]) is None


def test_steps_to_95_reached_at_first_point():
    # 0.95 * 0.8 = 0.76: the first point at or above it is step 50 (step 0 is 0.5)
    assert ec.steps_to_fraction([(0, 0.5), (50, 0.9), (100, 0.8)]) == 50


def test_summary_and_report(tmp_path):
    log = tmp_path / "curves.csv"
    ec.execute(runs(seeds=(0, 1, 2)), log, fake_train([]), out=lambda s: None)
    with pytest.raises(KeyboardInterrupt):  # an unfinished run must not enter the summary
        ec.execute(
            runs(seeds=(3,)), log, fake_train([], fail_at=("prompt-tuning", 3, 50)), out=lambda s: None
        )
    summary = ec.summarise(ec.read_log(log))
    assert [(s["method"], s["seeds"]) for s in summary] == [("prompt-tuning", 3), ("vip", 3)]
    s = summary[0]
    assert s["final_mean"] == pytest.approx(0.71)  # 0.5 + 0.2 + mean(0, 0.01, 0.02)
    assert s["final_sd"] == pytest.approx(0.01)
    assert s["gain_last_window"] == pytest.approx(0.1)  # 0.71 - 0.61
    assert s["steps_to_95_mean_curve"] == 200  # 0.95 * 0.71 = 0.6745; the mean curve is 0.66 at step 150
    assert s["step_ms_median"] == 500

    text = ec.report(log, tmp_path, baselines=False)
    assert "prompt-tuning" in text and "0.710 ± 0.010" in text
    assert "Unfinished (or still running) runs" in text and "'prompt-tuning', 0.01, 3, 200" in text
    assert (tmp_path / "converged_mr.png").stat().st_size > 1000
    with open(tmp_path / "converged_summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_one_runner_at_a_time(tmp_path):
    log = tmp_path / "curves.csv"
    with ec.log_lock(log), pytest.raises(SystemExit):
        ec.execute(runs(), log, fake_train([]), out=lambda s: None)


def test_gain_window():
    assert [ec.gain_window(s) for s in (300, 200, 100, 1)] == [100, 100, 50, 1]
