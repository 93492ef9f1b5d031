"""The developer tools: traffic meter (interpreter), compile check (sm_80/sm_90 without a GPU), roofline."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tool_kernels as tk
import torch

from prompt_kernels.kernels.registry import CompileSpec, LaunchCase
from prompt_kernels.tools import compile_check as cc
from prompt_kernels.tools import roofline
from prompt_kernels.tools.traffic import TrafficMeter

# ---------------------------------------------------------------------------------- traffic meter


def _interp(fn):
    return tk.jit(fn, interpret=True)


def test_meter_counts_copy_exactly():
    x, y = torch.randn(1000), torch.empty(1000)
    with TrafficMeter() as m:
        _interp(tk.copy_kernel)[(8,)](x, y, 1000, BLOCK=128)
    torch.testing.assert_close(y, x)
    (r,) = m.launches
    assert r.kernel == "copy_kernel"
    assert r.programs == 8 and r.grid == (8, 1, 1)
    assert (r.loaded_bytes, r.stored_bytes) == (4000, 4000)
    assert (r.unique_loaded_bytes, r.unique_stored_bytes) == (4000, 4000)
    assert r.dot_flops == 0
    assert m.totals.issued_bytes == 8000 and m.totals.programs == 8


def test_meter_excludes_masked_lanes():
    n = 999  # odd: 500 even indices
    x, y = torch.randn(n, dtype=torch.float16), torch.zeros(n, dtype=torch.float16)
    with TrafficMeter() as m:
        _interp(tk.even_copy_kernel)[(8,)](x, y, n, BLOCK=128)
    (r,) = m.launches
    assert (r.loaded_bytes, r.stored_bytes) == (500 * 2, 500 * 2)
    assert (r.unique_loaded_bytes, r.unique_stored_bytes) == (1000, 1000)


def test_meter_issued_versus_unique():
    x, y = torch.randn(300), torch.empty(300)
    with TrafficMeter() as m:
        _interp(tk.read_twice_kernel)[(3,)](x, y, 300, BLOCK=128)
    (r,) = m.launches
    assert r.loaded_bytes == 2 * 1200 and r.unique_loaded_bytes == 1200
    assert r.stored_bytes == r.unique_stored_bytes == 1200
    torch.testing.assert_close(y, 2 * x)


def test_meter_dot_flops_and_several_launches():
    M, N, K = 16, 32, 64
    a = torch.randn(M, K, dtype=torch.float16)
    b = torch.randn(K, N, dtype=torch.float16)
    c = torch.empty(M, N, dtype=torch.float16)
    dot = _interp(tk.dot_kernel)
    with TrafficMeter() as m:
        dot[(1,)](a, b, c, M=M, N=N, K=K)
        dot[(1,)](a, b, c, M=M, N=N, K=K)
    assert [r.dot_flops for r in m.launches] == [2 * M * N * K] * 2
    assert m.launches[0].loaded_bytes == (M * K + K * N) * 2
    assert m.launches[0].stored_bytes == M * N * 2
    assert m.totals.dot_flops == 4 * M * N * K and m.totals.launches == 2
    torch.testing.assert_close(c.float(), a.float() @ b.float(), atol=2e-2, rtol=2e-2)


def test_meter_counts_atomics_as_load_and_store():
    x, y = torch.randn(200), torch.zeros(200)
    with TrafficMeter() as m:
        _interp(tk.atomic_add_kernel)[(2,)](x, y, 200, BLOCK=128)
    (r,) = m.launches
    assert r.atomics == 2
    assert r.loaded_bytes == 800 + 800  # x, then y inside the atomic
    assert r.stored_bytes == 800
    torch.testing.assert_close(y, x)


def test_meter_restores_the_interpreter():
    x, y = torch.randn(10), torch.empty(10)
    with TrafficMeter() as m:
        pass
    _interp(tk.copy_kernel)[(1,)](x, y, 10, BLOCK=16)
    assert m.launches == []


# ---------------------------------------------------------------------------------- compile check

_PTXAS_SPILL_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spill_kernel' for 'sm_90a'
ptxas info    : Function properties for spill_kernel
    8232 bytes stack frame, 8216 bytes spill stores, 10012 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 8232 bytes cumulative stack size
"""


def test_parse_ptxas_log():
    info = cc.parse_ptxas_log(_PTXAS_SPILL_LOG)
    assert (info.registers, info.spill_store_bytes, info.spill_load_bytes) == (64, 8216, 10012)
    with pytest.raises(ValueError):
        cc.parse_ptxas_log("garbage")


def test_occupancy_rules():
    # 56 regs -> 1792 regs/warp -> 36 warps -> 9 blocks of 4 warps
    o = cc.occupancy(80, num_warps=4, registers=56, shared_bytes=8192)
    assert (o.blocks_per_sm, o.warps_per_sm, o.limiter) == (9, 36, "registers")
    # shared: 228 KiB / (100 KiB + 1 KiB) -> 2 blocks
    o = cc.occupancy(90, num_warps=4, registers=32, shared_bytes=100 * 1024)
    assert (o.blocks_per_sm, o.limiter) == (2, "shared")
    assert cc.occupancy(80, 4, 32, 200 * 1024).limiter == "does not fit"
    assert cc.occupancy(90, 1, 16, 0).blocks_per_sm == 32  # the block limit


def _compile_check_in_subprocess(*jobs):
    """Run compile-check jobs in a fresh Python without TRITON_INTERPRET (``tool_kernels.compile_check_child``).

    This session imported Triton with TRITON_INTERPRET=1, so Triton's own @jit helpers (tl.max, ...)
    are interpreted functions here and a real compile that reaches them fails (and leaves
    triton.language patched). Each job is ``(kind, spec set names, archs)``: ``"check"`` gives the
    list of CompileResult, ``"report"`` gives ``(exit status, printed text)`` of ``cc.report``.
    """
    root = Path(cc.__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        request, reply = Path(tmp) / "request.json", Path(tmp) / "reply.json"
        request.write_text(json.dumps([[kind, list(sets), list(archs)] for kind, sets, archs in jobs]))
        proc = subprocess.run(
            [sys.executable, tk.__file__, str(request), str(reply)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"compile-check subprocess failed:\n{proc.stdout}\n{proc.stderr}"
        replies = json.loads(reply.read_text())
    names = {f.name for f in dataclasses.fields(cc.CompileResult)}
    out = []
    for (kind, _, _), answer in zip(jobs, replies, strict=True):
        if kind == "report":
            out.append((answer["status"], answer["out"]))
            continue
        results = [cc.CompileResult(**{k: v for k, v in row.items() if k in names}) for row in answer]
        for r, row in zip(results, answer, strict=True):
            assert r.failures() == row["failures"], (r.name, r.arch)
        out.append(results)
    return out


def test_compile_check_reports_registers_and_tensor_cores():
    results, (status, out) = _compile_check_in_subprocess(
        ("check", ["copy_and_dot"], (80, 90)), ("report", ["copy_and_dot"], (80, 90))
    )
    by = {(r.name.split("[")[0], r.arch): r for r in results}
    for arch in (80, 90):
        copy, dot = by["copy", arch], by["dot", arch]
        for r in (copy, dot):
            assert r.ok, r.error
            assert r.registers > 0 and r.spill_bytes == 0 and r.failures() == []
            assert 0 < r.occupancy <= 1
        assert copy.tensor_cores == "–" and copy.tensor_core_ops == []
        assert dot.tensor_cores == "yes" and dot.low_precision and dot.shared_bytes > 0
    assert by["dot", 80].tensor_core_ops[0].startswith("HMMA")
    assert by["dot", 90].tensor_core_ops[0].startswith("HGMMA")
    assert status == 0, out
    assert "yes (HGMMA)" in out


def test_compile_check_fails_on_spills_and_errors():
    (r,), (e,), (status, out) = _compile_check_in_subprocess(
        ("check", ["spill"], (90,)),
        ("check", ["missing_constexpr"], (80,)),
        ("report", ["spill", "missing_constexpr"], (90,)),
    )
    assert r.ok and r.spill_store_bytes > 0 and r.spill_load_bytes > 0, r.error
    assert any("spills" in f for f in r.failures())
    assert not e.ok and e.failures()
    assert e.error.startswith("CompilationError"), e.error  # BLOCK is None: the kernel does not compile
    assert status == 1
    assert "FAIL spill[BLOCK=16384,w1] sm_90: spills" in out and "FAIL copy[missing constexpr]" in out


def test_compile_check_fails_when_fp16_dot_has_no_tensor_cores():
    # a copy kernel claiming uses_dot on fp16 data: no HMMA/HGMMA in its SASS -> failure
    ((r,),) = _compile_check_in_subprocess(("check", ["fake_dot"], (80,)))
    assert r.ok and r.tensor_cores == "no", r.error
    assert any("tensor-core" in f for f in r.failures())


def test_compile_check_refuses_interpreted_kernels():
    spec = CompileSpec("interp", _interp(tk.copy_kernel), tk.COPY_SIG, {"BLOCK": 128})
    (r,) = cc.check([("selftest", spec)], archs=(80,))
    assert not r.ok and "JITFunction" in r.error


# ---------------------------------------------------------------------------------- roofline


def _selftest_cases():
    n = 1000
    x, y = torch.randn(n), torch.empty(n)
    M, N, K = 16, 16, 32
    a, b = torch.randn(M, K, dtype=torch.float16), torch.randn(K, N, dtype=torch.float16)
    c = torch.empty(M, N, dtype=torch.float16)
    copy, twice, dot = _interp(tk.copy_kernel), _interp(tk.read_twice_kernel), _interp(tk.dot_kernel)
    return [
        LaunchCase(
            "prompt_pool-like copy", "prompt_pool", "forward", lambda: copy[(8,)](x, y, n, BLOCK=128), 8000, n
        ),
        # issued 12000 B against a floor of 7000 B: over the 1.5x goal
        LaunchCase(
            "prompt_pool-like twice",
            "prompt_pool",
            "forward",
            lambda: twice[(8,)](x, y, n, BLOCK=128),
            7000,
            n,
        ),
        LaunchCase(
            "selftest dot",
            "selftest_dot",
            "forward",
            lambda: dot[(1,)](a, b, c, M=M, N=N, K=K),
            (M * K + K * N + M * N) * 2,
            2 * M * N * K,
            scale_note="2*M*N*K",
        ),
        LaunchCase(
            "selftest copy claimed dot",
            "selftest_nodot",
            "forward",
            lambda: copy[(1,)](x, y, n, BLOCK=1024),
            8000,
            1,
        ),
        LaunchCase("selftest broken", "selftest", "forward", lambda: 1 / 0, 8, 1),
    ]


def test_roofline_rows_on_test_kernels():
    facts = [
        {"op": "selftest_dot", "arch": 90, "ok": True, "registers": 40, "shared_bytes": 2048, "occupancy": 0.5,
         "spill_bytes": 0, "tensor_cores": "yes"},
    ]  # fmt: skip
    rows = roofline.build_rows(
        _selftest_cases(), uses_dot_ops={"selftest_dot", "selftest_nodot"}, facts=facts
    )
    copy, twice, dot, nodot, broken = rows
    assert copy.issued_ratio == pytest.approx(1.0) and copy.memory_goal == "met" and copy.programs == 8
    assert twice.issued_bytes == 12000 and twice.unique_bytes == 8000 and twice.memory_goal == "not met"
    assert (
        dot.dot_flops == 2 * 16 * 16 * 32 and dot.flop_ratio == pytest.approx(1.0) and dot.dot_goal == "met"
    )
    assert dot.memory_goal == "–" and "regs 40-40" in dot.compile_facts and "TC yes" in dot.compile_facts
    assert nodot.dot_goal == "not met"
    assert broken.error.startswith("ZeroDivisionError") and broken.launches == 0
    expect_us = 1e6 * max(8000 / 3.35e12, 1000 / 990e12)
    assert copy.predicted_floor_us == pytest.approx(expect_us)
    text = roofline.format_rows(rows, markdown=True)
    assert sum(line.startswith("| ") for line in text.splitlines()) == len(rows) + 1
    assert "predicted H100" in text and "scale: 2*M*N*K" in text


def test_registered_launch_cases_have_positive_floors_and_run():
    from prompt_kernels.kernels import registry

    cases = registry.launch_cases()
    for case in cases:
        assert case.floor_bytes > 0 and case.floor_flops > 0, case.name
        assert case.direction in ("forward", "backward"), case.name
    rows = roofline.build_rows(cases, roofline.ops_using_dot(), facts=[])
    assert len(rows) == len(cases)
    for row in rows:
        assert row.error == "" and row.launches > 0 and row.issued_bytes > 0, (row.case, row.error)
        assert row.dot_goal != "not met", f"{row.case}: the op's CompileSpecs use tl.dot but no dot ran"
