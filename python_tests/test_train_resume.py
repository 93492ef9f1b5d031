"""``prompt-kernels train`` checkpoints, interruption and ``--resume``; ``prompt-kernels predict``.

A run killed mid-way (SIGINT, SIGTERM, or SIGKILL, which leaves only the periodic checkpoints) and
resumed ends bit for bit where an uninterrupted run of the same seed ends. The interrupted run is a
real ``prompt-kernels train`` process sent a real signal; a wrapper slows its optimizer steps so the
signal lands mid-run whatever the machine's speed.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from patch_helpers import one_thread  # noqa: F401  (autouse: the child runs with OMP_NUM_THREADS=1 too)
from safetensors.torch import load_file
from test_cli import TINY_ROWS, make_tiny_model_dir, write_csv

import prompt_kernels
from prompt_kernels import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(prompt_kernels.__file__)))
STEPS = 24
COMMON = ["--batch-size", "4", "--max-length", "16", "--prompt-length", "3", "--seed", "3"]

SLOW_CHILD = """
import sys, time
import torch

_step = torch.optim.AdamW.step


def slow_step(self, *args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = slow_step
from prompt_kernels.cli import main

raise SystemExit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_model_dir(root / "model")
    task = write_csv(root / "task.csv", TINY_ROWS)
    return root, model, task


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _train_argv(model, task, method):
    return ["train", "--no-progress", "--method", method, "--model", model, "--task", task]


def _reference(setup, method, capsys):
    root, model, task = setup
    out = root / f"reference-{method}"
    if not (out / "metrics.json").exists():
        rc, _, err = _main(
            capsys,
            *_train_argv(model, task, method),
            *COMMON,
            "--steps",
            str(STEPS),
            "--out",
            str(out),
            "--save-every",
            "5",
        )
        assert rc == 0, err
    return out


def _assert_same_run(a, b):
    for name in ("prompts.safetensors", "head.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs"
    ma, mb = json.load(open(a / "metrics.json")), json.load(open(b / "metrics.json"))
    assert ma["accuracy"] == mb["accuracy"] and ma["steps"] == mb["steps"] == STEPS


def _state(run):
    try:
        with open(run / "state.json") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _check_resume(run, reference, capsys, expected_steps=None):
    state = _state(run)
    assert 1 <= state["steps"] < STEPS and not state["complete"], state
    if expected_steps is not None:
        assert state["steps"] == expected_steps, state
    assert not (run / "metrics.json").exists()
    # An interrupted run finishes the plan it started with: another --steps is refused.
    rc, _, err = _main(capsys, "train", "--resume", str(run), "--steps", str(STEPS + 1))
    assert rc == 2 and f"--steps {STEPS + 1} conflicts" in err, err
    # Resuming takes every setting from the run folder (and writes back into it).
    rc, out, err = _main(capsys, "train", "--no-progress", "--resume", str(run))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == STEPS
    assert _state(run)["complete"] and _state(run)["steps"] == STEPS
    _assert_same_run(reference, run)
    assert not [f for f in os.listdir(run) if f.startswith(".")]  # no staging left behind


@pytest.mark.parametrize(
    "sig,method",
    [(signal.SIGINT, "vip"), (signal.SIGTERM, "prefix-tuning")],
    ids=["SIGINT-vip", "SIGTERM-prefix"],
)
def test_signal_mid_run_saves_and_resume_is_bit_identical(setup, tmp_path, capsys, monkeypatch, sig, method):
    """A real SIGINT/SIGTERM to this process, raised while the optimizer of step 5 runs: the step
    finishes, its checkpoint is written, the command exits with 128 + the signal number."""
    _, model, task = setup
    reference = _reference(setup, method, capsys)
    run = tmp_path / "run"
    calls = 0
    real_step = torch.optim.AdamW.step

    def step_then_signal(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:
            os.kill(os.getpid(), sig)
        return real_step(self, *args, **kwargs)

    def not_handled(signum, frame):  # reached only if train left the signal to the previous handler
        raise AssertionError(f"{signal.Signals(signum).name} was not handled by prompt-kernels train")

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    previous = signal.signal(sig, not_handled)
    try:
        argv = [*_train_argv(model, task, method), *COMMON, "--steps", str(STEPS), "--out", str(run)]
        rc, out, err = _main(capsys, *argv, "--save-every", "3")
    finally:
        signal.signal(sig, previous)
        monkeypatch.undo()
    assert rc == 128 + sig, err
    assert f"interrupted after step 5 of {STEPS}" in err and f"--resume {run}" in err, err
    assert out == ""  # no result line for an unfinished run
    _check_resume(run, reference, capsys, expected_steps=5)


def _same_search(a, b):
    """The same SPT search: gate trajectory (every gate step), selected layers, step counts."""
    ra, rb = (json.load(open(run / "spt_search.json")) for run in (a, b))
    assert ra == rb, (ra, rb)
    assert ra["search_steps"] == STEPS // 2 and ra["retrain_steps"] == STEPS - STEPS // 2
    assert len(ra["gate_trajectory"]) > 1 and ra["selected_layers"]


@pytest.mark.parametrize(
    "how,at,saved,phase",
    [("SIGINT", 5, 5, "search"), ("crash", 5, 3, "search"), ("crash", 17, 15, "retrain")],
    ids=["SIGINT-search", "crash-search", "crash-retrain"],
)
def test_spt_search_checkpoints_mid_search_and_resumes(
    setup, tmp_path, capsys, monkeypatch, how, at, saved, phase
):
    """``--method spt`` interrupted during its gate search (the first STEPS // 2 steps), by SIGINT (the
    checkpoint after the step in flight) or by a crash (the last --save-every checkpoint): the
    checkpoint holds the search (super-network gates and generators, head, both optimisers, record,
    D1/D2 order, generators), and the resumed run ends with the uninterrupted run's gates, selected
    layers, prompts, head and accuracy. Likewise a crash while the discrete model is retrained."""
    _, model, task = setup
    reference = _reference(setup, "spt", capsys)
    run = tmp_path / "run"
    calls = 0
    real_step = torch.optim.AdamW.step  # the search's ω optimiser (its α optimiser is an Adam)

    def step_then_stop(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == at:
            if how == "SIGINT":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError(f"crash in step {at}")
        return real_step(self, *args, **kwargs)

    def not_handled(signum, frame):  # reached only if train left the signal to the previous handler
        raise AssertionError(f"{signal.Signals(signum).name} was not handled by prompt-kernels train")

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_stop)
    # A test run started in the background (`cmd &`) inherits SIGINT ignored, which train keeps ignored.
    previous = signal.signal(signal.SIGINT, not_handled)
    try:
        argv = [*_train_argv(model, task, "spt"), *COMMON, "--steps", str(STEPS), "--out", str(run)]
        if how == "SIGINT":
            rc, _, err = _main(capsys, *argv, "--save-every", "3")
            assert rc == 128 + signal.SIGINT, err
            assert f"interrupted after step {at} of {STEPS}" in err, err
        else:
            with pytest.raises(RuntimeError, match=f"crash in step {at}"):
                cli.main([*argv, "--save-every", "3"])
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
    state = _state(run)
    assert state["spt"] == {"phase": phase, "search_steps": STEPS // 2}, state
    layers = json.load(open(run / "config.json"))["prompt_config"]["selected_layers"]
    if phase == "search":
        assert layers is None  # the super-network
        assert set(torch.load(run / "optimizer.pt", weights_only=True)["spt_search"]) == {"omega", "alpha"}
    else:
        assert layers == json.load(open(reference / "spt_search.json"))["selected_layers"]
    _check_resume(run, reference, capsys, expected_steps=saved)
    _same_search(reference, run)


def test_killed_run_resumes_from_its_last_periodic_checkpoint(setup, tmp_path, capsys):
    """SIGKILL (an OOM kill, a lost machine) to a real ``prompt-kernels train`` process: no handler
    runs, the last periodic checkpoint is whole and the resumed run ends where the uninterrupted one
    does. The child's optimizer steps are slowed (0.1 s) so the kill lands mid-run."""
    _, model, task = setup
    method = "prompt-tuning"
    reference = _reference(setup, method, capsys)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    (tmp_path / "child.py").write_text(SLOW_CHILD)
    argv = [*_train_argv(model, task, method), *COMMON, "--steps", str(STEPS), "--out", str(run)]
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "child.py"), "0.1", *argv, "--save-every", "2"],
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
        try:
            deadline = time.monotonic() + 120
            while (_state(run) or {}).get("steps", 0) < 4:  # the second periodic checkpoint
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no checkpoint after 120 s"
                time.sleep(0.01)
            proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _state(run)["steps"] % 2 == 0  # a periodic checkpoint
    _check_resume(run, reference, capsys)


def test_resume_refuses_conflicting_arguments(setup, tmp_path, capsys):
    _, model, task = setup
    run = tmp_path / "run"
    base = [*_train_argv(model, task, "prefix-tuning"), *COMMON, "--out", str(run)]
    rc, _, err = _main(capsys, *base, "--steps", "2")
    assert rc == 0, err
    before = {f: os.path.getmtime(run / f) for f in os.listdir(run)}
    other_model = make_tiny_model_dir(tmp_path / "other")
    three = write_csv(tmp_path / "three.csv", [*TINY_ROWS, ("a so-so movie", "meh")])
    cases = [
        (["--prompt-length", "5"], "--prompt-length 5"),
        (["--method", "prompt-tuning"], "--method prompt-tuning"),
        (["--model", other_model], "--model"),
        (["--task", three], "--task"),
        (["--batch-size", "8"], "--batch-size 8"),
        (["--seed", "4"], "--seed 4"),
    ]
    for extra, named in cases:
        rc, _, err = _main(capsys, "train", "--no-progress", "--resume", str(run), *extra)
        assert rc == 2 and named in err and "conflicts with the run" in err, (extra, err)
    assert {f: os.path.getmtime(run / f) for f in os.listdir(run)} == before  # nothing was written
    # The same values repeated are fine; --steps extends a finished run.
    rc, out, err = _main(capsys, *base, "--steps", "2", "--resume", str(run))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 4


def test_resume_after_the_csv_gained_a_label(setup, tmp_path, capsys):
    """The task file rewritten with a third label: named as such, not a raw size mismatch."""
    model = setup[1]
    task = write_csv(tmp_path / "task.csv", TINY_ROWS)
    run = tmp_path / "run"
    rc, _, err = _main(
        capsys, *_train_argv(model, task, "prefix-tuning"), *COMMON, "--steps", "1", "--out", str(run)
    )
    assert rc == 0, err
    write_csv(tmp_path / "task.csv", [*TINY_ROWS, ("a so-so movie", "meh")])
    rc, _, err = _main(capsys, "train", "--no-progress", "--resume", str(run))
    assert rc == 2 and "--task" in err and "3 labels" in err and "2 labels" in err, err
    assert "size mismatch" not in err


def test_resume_of_an_old_style_run_folder(setup, tmp_path, capsys):
    """Run folders written before checkpoints (state.json with method/steps/model/task only) resume."""
    _, model, task = setup
    run = tmp_path / "run"
    base = [*_train_argv(model, task, "prompt-tuning"), *COMMON, "--out", str(run)]
    assert _main(capsys, *base, "--steps", "2")[0] == 0
    for name in ("rng_state.pt", "metrics.json"):
        os.remove(run / name)
    with open(run / "state.json", "w") as f:
        json.dump({"method": "prompt-tuning", "steps": 2, "model": model, "task": task}, f)
    rc, out, err = _main(capsys, *base, "--steps", "1", "--resume", str(run))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 3


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    """A crash while the next checkpoint is being written leaves the previous one whole; a crash after
    it was complete but before it was moved into place is finished on the next read."""
    from prompt_kernels import train

    run = tmp_path / "run"

    def writers(step):
        def text(name):
            return lambda path: open(path, "w").write(f"{name} {step}")

        return {name: text(name) for name in ("a.txt", "b.txt", "state.json")}

    train.write_checkpoint(str(run), writers(1))
    assert {f: (run / f).read_text() for f in os.listdir(run)} == {
        "a.txt": "a.txt 1",
        "b.txt": "b.txt 1",
        "state.json": "state.json 1",
    }

    def crash(path):
        raise KeyboardInterrupt

    broken = writers(2)
    broken["b.txt"] = crash
    with pytest.raises(KeyboardInterrupt):
        train.write_checkpoint(str(run), broken)
    train.recover_checkpoint(str(run))
    assert sorted(os.listdir(run)) == ["a.txt", "b.txt", "state.json"]
    assert all((run / f).read_text().endswith(" 1") for f in os.listdir(run))

    moved = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        if os.path.basename(str(dst)) == "b.txt" and ".staging" in str(src):
            raise KeyboardInterrupt  # killed half-way through moving the files
        moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(train.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.write_checkpoint(str(run), writers(3))
    monkeypatch.setattr(train.os, "replace", real_replace)
    assert (run / "a.txt").read_text() == "a.txt 3" and (run / "b.txt").read_text() == "b.txt 1"
    train.recover_checkpoint(str(run))
    assert {f: (run / f).read_text() for f in os.listdir(run)} == {
        "a.txt": "a.txt 3",
        "b.txt": "b.txt 3",
        "state.json": "state.json 3",
    }


def test_predict(setup, tmp_path, capsys):
    _, model, task = setup
    run = tmp_path / "run"
    rc, out, err = _main(
        capsys, *_train_argv(model, task, "prompt-tuning"), *COMMON, "--steps", "3", "--out", str(run)
    )
    assert rc == 0, err
    assert json.load(open(run / "state.json"))["label_names"] == ["neg", "pos"]
    preds = tmp_path / "preds.csv"
    rc, out, err = _main(capsys, "predict", "--run", str(run), "--task", task, "--out", str(preds))
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(TINY_ROWS) == summary["examples"]
    assert [r["text"] for r in rows] == [t for t, _ in TINY_ROWS]
    assert {r["prediction"] for r in rows} <= {"neg", "pos"}
    accuracy = sum(r["prediction"] == lab for r, (_, lab) in zip(rows, TINY_ROWS)) / len(rows)
    assert summary["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    # No label column: predictions only, written as CSV to stdout.
    unlabeled = write_csv(tmp_path / "new.csv", [("a great movie",), ("an awful movie",)], header=("text",))
    rc, out, err = _main(capsys, "predict", "--run", str(run), "--task", unlabeled)
    assert rc == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["text"] for r in rows] == ["a great movie", "an awful movie"]
    assert {r["prediction"] for r in rows} <= {"neg", "pos"}
    assert json.loads(err.strip().splitlines()[-1])["accuracy"] is None
    # A label the run never saw is named.
    odd = write_csv(tmp_path / "odd.csv", [("a movie", "pos"), ("a film", "meh")])
    rc, _, err = _main(capsys, "predict", "--run", str(run), "--task", odd)
    assert rc == 2 and "'meh'" in err and "line 3" in err, err
    rc, _, err = _main(capsys, "predict", "--run", str(tmp_path / "nothing"), "--task", task)
    assert rc == 2 and "--run" in err, err


def test_resume_of_a_finished_run_without_steps_only_evaluates(setup, tmp_path, capsys):
    _, model, task = setup
    run = tmp_path / "run"
    base = [*_train_argv(model, task, "prompt-tuning"), *COMMON, "--out", str(run)]
    rc, out, err = _main(capsys, *base, "--steps", "2")
    assert rc == 0, err
    first = json.loads(out.strip().splitlines()[-1])
    prompts = load_file(run / "prompts.safetensors")
    rc, out, err = _main(capsys, "train", "--no-progress", "--resume", str(run))
    assert rc == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["steps"] == 2 and again["accuracy"] == first["accuracy"]
    assert all(torch.equal(v, load_file(run / "prompts.safetensors")[k]) for k, v in prompts.items())
