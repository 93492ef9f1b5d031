"""The deadlines of the multi-process test runs (``process_helpers``): a hung run is killed, with the
workers a launcher started in sessions of their own, and fails the test instead of hanging it."""

from __future__ import annotations

import os
import sys
import time
import warnings

import psutil
import pytest
from process_helpers import run_launcher, spawn

# A launcher whose worker runs in a session of its own (as torch's elastic agent starts them) and
# never ends; the worker writes its pid first.
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)",
                  sys.argv[1]], start_new_session=True)
time.sleep(600)
"""


def test_hung_launcher_and_its_detached_worker_are_killed(tmp_path):
    pid_file = tmp_path / "worker.pid"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"hung for 3 s \(try 2 of 2\)"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_launcher(
                lambda: [sys.executable, "-c", LAUNCHER, str(pid_file)],
                tmp_path / "logs",
                dict(os.environ),
                str(tmp_path),
                timeout=3,
            )
    assert time.monotonic() - start < 60
    assert any("try 1 of 2" in str(w.message) for w in caught)  # the first hang is reported, then retried
    worker = int(pid_file.read_text())
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_failing_launcher_is_not_retried(tmp_path):
    with pytest.raises(AssertionError, match="boom"):
        run_launcher(
            lambda: [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
            tmp_path / "logs",
            dict(os.environ),
            str(tmp_path),
            timeout=30,
        )
    assert sorted(os.listdir(tmp_path / "logs")) == ["stderr1.txt", "stdout1.txt"]


def _sleeper(rank, port):
    time.sleep(600)


def test_hung_spawn_fails(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"hung for 5 s \(try 1 of 1\)"):
        spawn(_sleeper, lambda port: (port,), 2, timeout=5, tries=1)
    assert time.monotonic() - start < 60
