"""Multi-process test runs that cannot hang the test session.

A gloo process group can hang (a rendezvous that never completes, a destructor that deadlocks on the
GIL). ``mp.spawn(join=True)`` and ``Popen.communicate()`` would then wait for ever: once, a CI run
waited 80 minutes on one such test. Here every run has a deadline; past it, the whole process tree
is killed (torch's elastic launcher starts each worker in a session of its own, so killing the
launcher's process group does not reach them), the workers' Python stacks (``faulthandler``, dumped
shortly before the deadline) are reported, and the run is tried once more. A second hang fails the
test. A run that ends with an error is never retried.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import time
import warnings

import psutil
import pytest
import torch.multiprocessing as mp

HANG_DUMP_ENV = "PK_TEST_HANG_DUMP_S"  # workers dump their stacks after this many seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm_hang_dump() -> None:
    """In a worker: dump every thread's stack to stderr if the run is still going at the deadline."""
    seconds = float(os.environ.get(HANG_DUMP_ENV, "0"))
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=False)


def finish_worker() -> None:
    """In a worker whose results are written: wait for the other ranks, then leave without running
    destructors. Freeing a DistributedDataParallel's reducer joins the gloo threads while holding the
    GIL, and a gloo thread freeing a finished work item waits for the GIL: a deadlock seen about one
    run in thirty (py-spy: ``~ProcessGroupGloo`` in ``std::thread::join`` under ``~Reducer``; a gloo
    thread in ``gil_scoped_acquire`` under ``~AsyncAllgatherWork``), ``destroy_process_group`` or not.
    Upstream: pytorch/pytorch#56297 (blocking ``~ProcessGroupGloo`` bound without releasing the GIL)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill_tree(pids) -> None:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _tail(path, n=6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except FileNotFoundError:
        return ""


def run_launcher(make_cmd, log_dir, env, cwd, timeout=150, tries=2) -> None:
    """Run ``make_cmd()`` (a fresh command, so a fresh port, per try); fail the test unless it exits 0.

    Output goes to files in ``log_dir`` (a pipe stays open as long as any worker lives).
    """
    os.makedirs(log_dir, exist_ok=True)
    env = dict(env, **{HANG_DUMP_ENV: str(max(timeout - 30, 1))})
    for attempt in range(1, tries + 1):
        out_path = os.path.join(log_dir, f"stdout{attempt}.txt")
        err_path = os.path.join(log_dir, f"stderr{attempt}.txt")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(make_cmd(), env=env, cwd=cwd, stdout=out, stderr=err)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree([proc.pid])
                proc.wait()
                report = f"hung for {timeout} s (try {attempt} of {tries}):\n{_tail(out_path, 2000)}{_tail(err_path)}"
                if attempt == tries:
                    pytest.fail(report)
                warnings.warn(f"multi-process run {report}", stacklevel=2)
                continue
        assert proc.returncode == 0, _tail(out_path, 3000) + _tail(err_path)
        return


def spawn(fn, args_for_port, nprocs, timeout=150, tries=2) -> None:
    """``mp.spawn(fn, args_for_port(port), nprocs)`` with a deadline; a fresh port per try.

    ``fn`` should call :func:`arm_hang_dump` first; the deadline is passed through the environment.
    """
    os.environ[HANG_DUMP_ENV] = str(max(timeout - 30, 1))
    try:
        for attempt in range(1, tries + 1):
            ctx = mp.spawn(fn, args=args_for_port(free_port()), nprocs=nprocs, join=False)
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=1):  # raises if a worker failed
                if time.monotonic() > deadline:
                    break
            else:
                return
            _kill_tree([p.pid for p in ctx.processes])
            sys.stderr.flush()
            report = f"hung for {timeout} s (try {attempt} of {tries}); the workers' stacks are in the captured stderr"
            if attempt == tries:
                pytest.fail(report)
            warnings.warn(f"multi-process run {report}", stacklevel=2)
    finally:
        os.environ.pop(HANG_DUMP_ENV, None)
