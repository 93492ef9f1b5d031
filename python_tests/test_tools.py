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
import triton

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


_TTIR = """module {
  tt.func public @k(%a: !tt.ptr<f16>) {
    %x = tt.load %p : tensor<64x32x!tt.ptr<f16>> loc(#loc1)
    %r:2 = scf.for %k0 = %c0 to %K step %c32 iter_args(%acc = %cst) -> (tensor<64x64xf32>)  : i32 {
      %b = tt.load %q : tensor<32x64x!tt.ptr<f16>> loc(#loc2)
      %d = tt.dot %x, %b, %acc, inputPrecision = tf32 : tensor<64x32xf16> * tensor<32x64xf16> -> tensor<64x64xf32> loc(#loc3)
      scf.yield %d : tensor<64x64xf32> loc(#loc4)
    } loc(#loc5)
    %e = tt.dot %u, %v, %w : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32> loc(#loc6)
    tt.return loc(#loc7)
  } loc(#loc8)
} loc(#loc9)
"""


def test_ttir_facts_reads_dot_types_and_dot_loops():
    f = cc.ttir_facts(_TTIR)
    assert f["dots"] == ["f16", "f32/ieee"]  # no inputPrecision attribute: IEEE
    assert f["tensor_core_dot"] and f["dot_loop"]
    no_loop = _TTIR.replace("scf.for", "scf.if_not_a_loop")
    assert not cc.ttir_facts(no_loop)["dot_loop"]
    fp32_only = "%e = tt.dot %u, %v, %w : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32>"
    assert cc.ttir_facts(fp32_only) == {"dots": ["f32/ieee"], "tensor_core_dot": False, "dot_loop": False}
    tf32 = fp32_only.replace("%w :", "%w, inputPrecision = tf32 :")
    assert cc.ttir_facts(tf32)["tensor_core_dot"]


def test_ptx_facts_reads_mma_kind_and_async_copies():
    ptx = """
    cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
    cp.async.commit_group;
    cp.async.wait_group 0;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %f1 }, { %r1 }, { %r2 }, { %f1 };
    """
    f = cc.ptx_facts(ptx)
    assert f["mma_kind"] == "HMMA" and f["async_copies"] == {"cp.async": 1}
    assert f["mma_ops"] == ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"]
    hopper = (
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {..};\ncp.async.bulk.tensor.2d.shared::cluster"
    )
    f = cc.ptx_facts(hopper)
    assert f["mma_kind"] == "HGMMA" and f["async_copies"] == {"TMA": 1}
    assert cc.ptx_facts("ld.global.v4.b32") == {"mma_kind": "", "mma_ops": [], "async_copies": {}}


def _result(name, arch, **kw):
    base = dict(name=name, op="selftest", arch=arch, num_warps=4, num_stages=2, ok=True, registers=32)
    return cc.CompileResult(**(base | kw))


def test_known_failures_are_reported_not_failing():
    from prompt_kernels.kernels.registry import KnownFailure

    spill = _result("k[fp16,BM=16]", 90, spill_store_bytes=8)
    hmma = _result("k[bf16,BM=16]", 90, dots=["bf16"], tensor_core_dot=True, mma_kind="HMMA")
    other = _result("k[fp32,BM=16]", 90, spill_load_bytes=4)  # not covered: "*16" does not match fp32
    fine = _result("j[fp16,BM=64]", 90)
    known = [
        KnownFailure("k[*16,**", (90,), "spills", "tile too big"),
        KnownFailure("k[*16,**", (90,), "hgmma", "16 rows"),
        KnownFailure("j[**", (90,), "spills", "fixed since"),  # matches a name but no failure: stale
        KnownFailure("k[**", (80,), "spills", "other arch"),  # matches no compiled name: not stale
    ]
    warnings = cc.apply_known_failures([spill, hmma, other, fine], known)
    assert spill.verdict == "known" and spill.open_failures() == [] and "tile too big" in spill.known[0]
    assert hmma.verdict == "known" and "16 rows" in hmma.known[0]
    assert other.verdict == "FAIL" and other.open_failures() == other.failures()
    assert fine.verdict == "ok"
    assert len(warnings) == 1 and "'j[**'" in warnings[0]
    table = cc.format_table([spill, hmma, other, fine])
    assert table.count("known") == 2 and table.count("FAIL") == 1
    summary = cc.summary_table([spill, hmma, other, fine])
    assert (
        "known 1: spills" in summary and "known 1: HMMA not HGMMA" in summary and "FAIL 1: spills" in summary
    )


def test_capture_reports_the_checked_architecture():
    from prompt_kernels.kernels import registry

    with cc.capture_launches(90, [], lambda: "test"):
        assert registry.target_arch() == 90
    from triton.runtime import driver

    assert not getattr(getattr(driver, "_active", None), "compile_only", False)  # restored


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


def test_compile_check_compiles_what_launches():
    """Registers, MMA kind, asynchronous copies and the launch specialisation, on sm_80 and sm_90; the
    spec-versus-launcher num_stages check; the pipelined loop without asynchronous copies."""
    results, stages, pipeline, (status, out) = _compile_check_in_subprocess(
        ("check", ["copy_and_dot"], (80, 90)),
        ("check", ["stages_differ"], (90,)),
        ("check", ["pipeline"], (80,)),
        ("report", ["copy_and_dot"], (80, 90)),
    )
    by = {(r.name.split("[")[0], r.arch): r for r in results}
    for arch in (80, 90):
        copy, dot = by["copy", arch], by["dot", arch]
        for r in (copy, dot):
            assert r.ok, r.error
            assert r.registers > 0 and r.spill_bytes == 0 and r.failures() == []
            assert 0 < r.occupancy <= 1
            assert r.num_stages == 3  # neither the spec nor the launch says: the JIT's default
        assert copy.tensor_cores == "–" and copy.mma_kind == "" and copy.dots == []
        assert copy.specialisation == "div16 3/3"  # both pointers and n = 4096
        assert dot.tensor_cores == "yes" and dot.dots == ["f16"] and dot.shared_bytes > 0
    assert by["dot", 80].mma_kind == "HMMA" and by["dot", 90].mma_kind == "HGMMA"
    assert status == 0, out
    assert "HGMMA" in out and "ptxas" in out.splitlines()[0]

    (r,) = stages
    assert r.specialisation == "div16 2/2, =1 n"  # n == 1 became a constexpr, as at launch
    assert r.num_stages == 3 and any("num_stages=3" in f and "the spec says 4, 2" in f for f in r.failures())

    loop, nested = sorted(pipeline, key=lambda r: r.name)
    assert loop.name.startswith("loop_dot") and loop.ok and loop.dot_loop
    assert loop.async_copies.get("cp.async", 0) > 0 and loop.failures() == []
    assert nested.ok and nested.dot_loop and nested.n_async == 0
    assert nested.failures() == ["num_stages=2 but the tl.dot loop has no asynchronous copy"]


def test_compile_check_failures():
    spill, bad, fake, small, nolaunch, (status, out) = _compile_check_in_subprocess(
        ("check", ["spill"], (90,)),
        ("check", ["bad_constexpr"], (80,)),
        ("check", ["fake_dot"], (80,)),
        ("check", ["small_dot"], (80, 90)),
        ("check", ["no_launch"], (80,)),
        ("report", ["spill", "bad_constexpr"], (90,)),
    )
    (r,) = spill
    assert r.ok and r.spill_store_bytes > 0 and r.spill_load_bytes > 0, r.error
    assert any("spills" in f for f in r.failures())
    e, launched = sorted(bad, key=lambda r: r.name)  # the spec, and the launch case's own BLOCK=128
    assert launched.name == "copy_kernel[fp32,BLOCK=128] (launch case)" and launched.failures() == []
    assert not e.ok and e.failures() and e.error.startswith("CompilationError"), e.error
    (f,) = fake
    assert f.ok and f.failures() == ["the spec says uses_dot but the kernel compiles no tl.dot"]
    s80, s90 = sorted((r for r in small if r.name == "dot[fp16,16x16x32]"), key=lambda r: r.arch)
    assert s80.mma_kind == "HMMA" and s80.failures() == []
    assert s90.mma_kind == "HMMA" and s90.failures() == ["tl.dot on f16 needs HGMMA on sm_90: HMMA only"]
    (n,) = nolaunch
    assert n.ok and any("no launch case launches read_twice_kernel" in x for x in n.failures())
    assert status == 1
    assert "FAIL spill[BLOCK=16384,w1] sm_90: spills" in out and "FAIL copy[BLOCK=3]" in out


def test_compile_check_refuses_interpreted_kernels():
    interp = _interp(tk.copy_kernel)
    spec = CompileSpec("interp", interp, tk.COPY_SIG, {"BLOCK": 128})
    (r,) = cc.check([("selftest", spec)], archs=(80,))  # no launch: compiled as declared
    assert not r.ok and "JITFunction" in r.error


# ---------------------------------------------------------------------------------- gpu check


def test_gpu_check_dry_mode_runs_every_case_on_cpu():
    """``benchmarks.gpu_check --dry``: the kernel tests collected without the interpreter, every op
    benchmark case built and run once on CPU, one CSV and the summary written."""
    root = Path(cc.__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", tmp],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        import csv

        rows = list(csv.DictReader(open(Path(tmp) / "gpu_check.csv")))
        summary = (Path(tmp) / "gpu_check.md").read_text()
    kernels = {r["kernel"] for r in rows}
    assert {"gated_prefix_attention", "phm_linear", "prompt_pool", "vq_nearest"} <= kernels, kernels
    assert {r["metric"] for r in rows} == {"time", "peak_memory"}
    for kernel in kernels:
        providers = {r["provider"] for r in rows if r["kernel"] == kernel}
        assert "prompt_kernels" in providers and "torch_reference" in providers, (kernel, providers)
    assert "dry run" in summary and "collected" in summary and "## Errors" not in summary


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
        # registered under "selftest": matches the "selftest_dot" case's op, narrowed to its kernel
        {"op": "selftest", "kernel": "dot_kernel", "arch": 90, "ok": True, "registers": 40, "shared_bytes": 2048,
         "occupancy": 0.5, "spill_bytes": 0, "mma_kind": "HGMMA", "async_copies": {}, "failures": []},
        {"op": "selftest", "kernel": "other_kernel", "arch": 90, "ok": True, "registers": 99, "shared_bytes": 0,
         "occupancy": 0.5, "spill_bytes": 0, "mma_kind": "", "async_copies": {}, "failures": []},
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
    assert dot.memory_goal == "–" and "regs 40-40" in dot.compile_facts and "MMA HGMMA" in dot.compile_facts
    assert "no compile facts" in copy.compile_facts
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


# ------------------------------------------------------------------ per-architecture tile tables


def _tile_choosers():
    """``(op, kernel, dtype, choose(arch, shape) -> candidates, shapes)`` for every table-driven launch
    of phm_linear, vq, prompt_pool and gated_prefix_attention. Shapes are swept more widely than the
    modules' own sweeps that build the compile specs, so a candidate reachable only at some other shape
    is caught."""
    from prompt_kernels.kernels import gated_prefix_attention as gpa
    from prompt_kernels.kernels import phm_linear as phm
    from prompt_kernels.kernels import prompt_pool as pool
    from prompt_kernels.kernels import vq

    widths = (1, 3, 8, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 96, 100, 128, 384, 1000)
    pairs = [(a, b) for a in widths for b in widths]
    out = []
    for dt in phm.DTYPES:
        out.append(
            ("phm fwd", phm._forward_kernel, dt, lambda a, s, dt=dt: phm.mm_candidates(a, dt, *s), pairs)
        )
        out.append(
            ("phm grad_x", phm._grad_x_kernel, dt, lambda a, s, dt=dt: phm.mm_candidates(a, dt, *s), pairs)
        )
    for dt in vq.DTYPES:
        scan = lambda a, D, dt=dt: vq.scan_candidates(a, dt, D)
        out.append(("vq nearest", vq._nearest_kernel, dt, scan, widths))
        out.append(("vq nearest_split", vq._nearest_split_kernel, dt, scan, widths))
        out.append(
            ("vq sample", vq._sample_kernel, dt, lambda a, D, dt=dt: (vq.sample_config(a, dt, D),), widths)
        )
    shapes = [
        (D, T, L) for D in widths for T in (1, 2, 7, 24, 100, 128, 129, 4096) for L in (1, 3, 5, 16, 64)
    ]
    for dt in pool.DTYPES:
        out.append(
            ("pool fwd", pool._forward_kernel, dt, lambda a, s: pool.forward_candidates(a, *s), shapes)
        )
        out.append(
            ("pool bwd", pool._backward_kernel, dt, lambda a, s: pool.backward_candidates(a, s[0]), shapes)
        )
    for dt in gpa.DTYPES:  # every head size the Triton path takes (gpa.supports), each kernel
        for name, kernel in gpa._KERNEL_NAMES.items():
            choose = lambda a, Dh, dt=dt, name=name: gpa.candidates(name, a, dt, Dh)
            out.append((f"gpa {name}", getattr(gpa, kernel), dt, choose, gpa.HEAD_DIMS))
    return out


_TL = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def test_tile_tables_give_valid_configs_per_arch():
    """sm_80, sm_90 and other architectures (the default row, also the interpreter's) each get 1 to 4
    distinct candidates with power-of-two tiles; other architectures get the default row, which is
    sm_80's."""
    from prompt_kernels.kernels import phm_linear as phm
    from prompt_kernels.kernels import registry, vq

    for op, _, _dt, choose, shapes in _tile_choosers():
        for shape in shapes[::7]:
            for arch in (80, 90, registry.DEFAULT_ARCH, 75, 89, 100, 120):
                cands = choose(arch, shape)
                assert 1 <= len(cands) <= 4 and len(set(cands)) == len(cands), (op, arch, shape, cands)
                for c in cands:
                    assert c.num_warps in (1, 2, 4, 8) and c.num_stages in (None, 1, 2, 3, 4)
                    for k, v in c.kwargs.items():
                        if k.startswith("BLOCK_"):
                            assert v >= 1 and v & (v - 1) == 0, (op, c)
                if arch not in registry.TABLE_ARCHS:
                    assert cands == choose(80, shape) == choose(registry.DEFAULT_ARCH, shape), (op, arch)
    assert registry.arch_row({80: "a", 90: "b", 0: "d"}, 90) == "b"
    assert registry.arch_row({80: "a", 90: "b", 0: "d"}, 89) == "d"
    # facts the tables encode (benchmarks/notes): HGMMA tiles keep 64 rows and 4 warps on sm_90
    for dt in (torch.float16, torch.bfloat16):
        for c in phm.mm_candidates(90, dt, 100, 100):
            assert c.kwargs["BLOCK_M"] == 64 and c.num_warps == 4 and c.num_stages == 2
        for arch in (80, 90):  # BK=32 never gains occupancy: offered second
            assert [c.kwargs["BLOCK_K"] for c in phm.mm_candidates(arch, dt, 16, 32)] == [16, 32]
        assert [c.kwargs["BLOCK_D"] for c in vq.scan_candidates(90, dt, 384)] == [64, 64, 32]
        assert vq.sample_config(90, dt, 384).kwargs["BLOCK_D"] == 16  # 32/64 spill on sm_90
    assert all(c.kwargs["BLOCK_D"] == 64 for c in vq.scan_candidates(90, torch.float32, 8))  # BD=16 spills


def test_every_tile_candidate_is_a_compile_spec():
    """What autotune (or the fixed choice) can launch on sm_80 / sm_90 is exactly among the compile
    check's specs for that architecture: same kernel, tile constexprs, num_warps, num_stages, dtype.
    Fails when someone adds a candidate that the gate does not compile."""
    from prompt_kernels.kernels import registry

    specs = registry.compile_specs()
    index: dict = {}
    for s in specs:
        ptr_types = {v for v in s.signature.values() if isinstance(v, str) and v.startswith("*")}
        for arch in s.archs or (80, 90):
            index.setdefault((id(s.kernel), arch), []).append((s, ptr_types))
    missing = []
    for op, kernel, dt, choose, shapes in _tile_choosers():
        seen = set()
        for shape in shapes:
            for arch in (80, 90):
                for c in choose(arch, shape):
                    if (arch, c) in seen:
                        continue
                    seen.add((arch, c))
                    ok = any(
                        _TL[dt] in ptrs
                        and all(s.constexprs.get(k) == v for k, v in c.kwargs.items())
                        and s.num_warps == c.num_warps
                        and s.num_stages == c.num_stages
                        for s, ptrs in index.get((id(kernel), arch), [])
                    )
                    if not ok:
                        missing.append((op, str(dt), arch, c))
    assert not missing, f"candidates without a CompileSpec: {missing[:5]} ({len(missing)})"


def test_fixed_config_under_the_interpreter_and_the_compile_check(monkeypatch):
    """The interpreter uses the default row and never autotunes; under the compile check's
    compile-only target the launch uses the checked architecture's row, fixed, no autotune."""
    import prompt_kernels.kernels as kernels_pkg
    from prompt_kernels.kernels import phm_linear as phm
    from prompt_kernels.kernels import registry

    cpu = torch.device("cpu")
    assert kernels_pkg.interpreting()
    assert registry.launch_arch(cpu) == registry.DEFAULT_ARCH
    assert not registry.autotune_enabled(cpu) and not registry.autotune_enabled(torch.device("cuda"))
    monkeypatch.setattr(kernels_pkg, "interpreting", lambda: False)
    with cc.capture_launches(90, [], lambda: "test"):
        assert registry.compile_only() and registry.launch_arch(cpu) == 90
        assert not registry.autotune_enabled(torch.device("cuda"))  # the check compiles the fixed choice
    monkeypatch.setenv(registry.AUTOTUNE_ENV, "0")
    assert not registry.autotune_enabled(torch.device("cuda"))
    monkeypatch.delenv(registry.AUTOTUNE_ENV)
    assert registry.autotune_enabled(torch.device("cuda")) and not registry.autotune_enabled(cpu)

    # the autotuner offered on a GPU: the candidates as triton.Configs, the op's key
    tuned = registry.TunedKernel(phm._forward_kernel, key=["n", "I", "O"])
    cands = phm.mm_candidates(90, torch.float16, 48, 96)
    t = tuned.tuner(cands)
    assert t is tuned.tuner(cands) and t.keys == ["n", "I", "O"] and t.fn is phm._forward_kernel
    assert len(t.configs) == len(cands) and all(c.matches(tc) for c, tc in zip(cands, t.configs, strict=True))
    assert not cands[0].matches(t.configs[1])


def test_autotune_path_benchmarks_every_candidate_and_launches_the_pick(monkeypatch):
    """The GPU path, run under the interpreter with a stand-in timer: every candidate runs on the real
    arguments (grid from the candidate's tiles), the fastest is launched and cached per key, the
    values are right (outputs written once: no reset needed)."""
    from prompt_kernels.kernels import phm_linear as phm
    from prompt_kernels.kernels import prompt_pool as pool
    from prompt_kernels.kernels import registry
    from prompt_kernels.ops.reference import phm_linear as phm_ref
    from prompt_kernels.ops.reference import prompt_pool as pool_ref

    monkeypatch.setattr(registry, "autotune_enabled", lambda device: True)
    times = iter([3.0, 1.0, 5.0, 2.0, 4.0, 6.0])
    ran = []

    def bench(fn, quantiles=None):
        fn()
        t = next(times)
        ran.append(t)
        return [t, t, t]

    tuned = registry.TunedKernel(phm._forward_kernel, key=["n", "I", "O"], do_bench=bench)
    n, p, q, N = 2, 40, 40, 5
    x, rules, w = torch.randn(N, n * p), torch.randn(n, n, n), torch.randn(n, p, q)
    out = torch.full((N, n * q), float("nan"))
    cands = phm.mm_candidates(registry.DEFAULT_ARCH, torch.float32, q, p, n)
    assert len(cands) == 2
    args = (x, rules, w, out, out, N, n, p, q, 0, x.stride(0), x.stride(1), out.stride(0))
    np2 = phm.mm_unroll(torch.float32, n)

    def grid(m):
        return (triton.cdiv(N, m["BLOCK_M"]), triton.cdiv(q, m["BLOCK_N"] // np2))

    got = tuned.launch(grid, cands, *args, DOT_PRECISION="ieee", N_UNROLL=np2, device=x.device)
    assert got == cands[1] and ran == [3.0, 1.0]  # both benchmarked, the faster launched
    torch.testing.assert_close(out, phm_ref(x, rules, w))
    assert tuned.launch(grid, cands, *args, DOT_PRECISION="ieee", N_UNROLL=np2, device=x.device) == cands[1]
    assert ran == [3.0, 1.0]  # cached for the key (n, I, O, dtype): no second benchmark

    # prompt_pool forward: the mask kind (a constexpr keyword) is part of the key
    tuned = registry.TunedKernel(pool._forward_kernel, key=["D", "L", "HAS_MASK"], do_bench=bench)
    B, T, D, L = 2, 24, 80, 5
    xp = torch.randn(B, T, D)
    cands = pool.forward_candidates(registry.DEFAULT_ARCH, D, T, L)
    outp = torch.full((B, L, D), float("nan"))
    unused = torch.empty(1, dtype=torch.int32)
    pargs = (xp, unused, unused, outp, T, D, L, xp.stride(0), xp.stride(1), xp.stride(2))
    got = tuned.launch(
        lambda m: (B * L, triton.cdiv(D, m["BLOCK_D"])), cands, *pargs, HAS_MASK=False, device="x"
    )
    assert len(cands) == 3 and got == cands[1] and ran[2:] == [5.0, 2.0, 4.0]
    torch.testing.assert_close(outp, pool_ref(xp, None, L))
    (t,) = tuned.tuners.values()
    assert [k[:4] for k in t.cache] == [(D, L, False, "torch.float32")]  # then the other tensors' dtypes
