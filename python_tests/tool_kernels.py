"""Small Triton kernels that exercise the tools (compile check, traffic meter, roofline).

They are plain functions here; :func:`jit` wraps one as a real ``JITFunction`` (for the compile check)
or as an interpreted function (for the traffic meter), whatever ``TRITON_INTERPRET`` says, because the
test session sets ``TRITON_INTERPRET=1`` for the op kernels. They never enter the real registry.

The compile-check tests compile in a subprocess without ``TRITON_INTERPRET`` (see
:func:`compile_check_child`), the specs of :func:`compile_specs` specialised by the launches of
:func:`compile_launches` (CPU tensors; the check captures them, nothing runs): in a process where it was set when Triton was imported, Triton's own
``@triton.jit`` helpers (``tl.max``, ``tl.sum``, ...) are interpreted functions, which fail inside a
real compile and leave ``triton.language`` patched for the interpreter, breaking later compiles too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import triton
import triton.language as tl


def jit(fn, interpret: bool):
    """``triton.jit(fn)`` as a JITFunction (``interpret=False``) or an InterpretedFunction."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(fn)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y[i] = x[i] for i < n, one BLOCK per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def even_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y[i] = x[i] for even i < n only (half the lanes masked off); no ``other`` value."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < n) & (offs % 2 == 0)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def read_twice_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y[i] = x[i] + x[i], loading x twice."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask)
    b = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, a + b, mask=mask)


def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N] in one program, row-major contiguous; fp32 accumulator."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    c = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c.to(c_ptr.dtype.element_ty))


def spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Keeps a whole BLOCK of fp32 alive across a reduction: with BLOCK=16384 and one warp that is
    512 values per thread, more than the 255 registers a thread can have, so ptxas must spill."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    tl.store(y_ptr + offs, tl.exp(x - m) / s)


def loop_dot_kernel(a_ptr, b_ptr, c_ptr, K, M: tl.constexpr, N: tl.constexpr, BK: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N] with the K loop in BK chunks: the loop Triton pipelines (cp.async
    on sm_80 and sm_90) when num_stages >= 2."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, BK)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def nested_loop_dot_kernel(a_ptr, b_ptr, c_ptr, K, R, M: tl.constexpr, N: tl.constexpr, BK: tl.constexpr):
    """As ``loop_dot_kernel``, but each b tile is a sum of R tiles from an inner loop: the K loop is not
    innermost and Triton does not pipeline it, whatever num_stages says (no asynchronous copy)."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, BK)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.zeros((BK, N), dtype=tl.float32)
        for r in range(0, R):
            b += tl.load(b_ptr + r * K * N + (k0 + rk)[:, None] * N + rn[None, :]).to(tl.float32)
        acc = tl.dot(a, b.to(a.dtype), acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


DOT_SIG_FP16 = {
    "a_ptr": "*fp16",
    "b_ptr": "*fp16",
    "c_ptr": "*fp16",
    "M": "constexpr",
    "N": "constexpr",
    "K": "constexpr",
}
COPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
SPILL_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}


def atomic_add_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y[i] += x[i] with an atomic add."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.atomic_add(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


# ------------------------------------------------------------------ compile-check specs and subprocess


_JIT: dict = {}


def real(fn):
    """``fn`` as one (cached) real JITFunction, so that specs and launches share the kernel object."""
    if fn.__name__ not in _JIT:
        _JIT[fn.__name__] = jit(fn, interpret=False)
    return _JIT[fn.__name__]


def _loop_sig(nested: bool) -> dict:
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "i32"}
    if nested:
        sig["R"] = "i32"
    return sig | {"M": "constexpr", "N": "constexpr", "BK": "constexpr"}


def compile_specs(name: str) -> list:
    """A named set of ``(op, CompileSpec)`` of these kernels as real JITFunctions, for the compile check."""
    from prompt_kernels.kernels.registry import CompileSpec

    copy = real(copy_kernel)
    if name == "copy_and_dot":
        mnk = {"M": 64, "N": 64, "K": 32}
        return [
            ("selftest", CompileSpec("copy[fp32,BLOCK=128]", copy, COPY_SIG, {"BLOCK": 128})),
            (
                "selftest",
                CompileSpec("dot[fp16,64x64x32]", real(dot_kernel), DOT_SIG_FP16, mnk, uses_dot=True),
            ),
        ]
    if name == "stages_differ":  # the launcher passes no num_stages (3 on CUDA), the spec says 2
        return [("selftest", CompileSpec("copy[fp32,BLOCK=64]", copy, COPY_SIG, {"BLOCK": 64}, num_stages=2))]
    if name == "spill":
        spill = real(spill_kernel)
        spec = CompileSpec("spill[BLOCK=16384,w1]", spill, SPILL_SIG, {"BLOCK": 16384}, num_warps=1)
        return [("selftest", spec)]
    if name == "bad_constexpr":  # tl.arange of a length that is not a power of two: no compile
        return [("selftest", CompileSpec("copy[BLOCK=3]", copy, COPY_SIG, {"BLOCK": 3}))]
    if name == "fake_dot":
        # a copy kernel claiming uses_dot on fp16 data: it compiles no tl.dot
        sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}
        return [("selftest", CompileSpec("fake-dot", copy, sig, {"BLOCK": 64}, uses_dot=True))]
    if name == "small_dot":  # 16 rows: below wgmma's 64, so HMMA on sm_90
        mnk = {"M": 16, "N": 16, "K": 32}
        return [
            (
                "selftest",
                CompileSpec("dot[fp16,16x16x32]", real(dot_kernel), DOT_SIG_FP16, mnk, uses_dot=True),
            )
        ]
    if name == "pipeline":
        tiles = {"M": 64, "N": 64, "BK": 32}
        return [
            (
                "selftest",
                CompileSpec("loop_dot[fp16]", real(loop_dot_kernel), _loop_sig(False), tiles, num_stages=3),
            ),
            (
                "selftest",
                CompileSpec(
                    "nested_dot[fp16]", real(nested_loop_dot_kernel), _loop_sig(True), tiles, num_stages=2
                ),
            ),
        ]
    if name == "no_launch":
        return [
            (
                "nolaunch",
                CompileSpec("read_twice[fp32,BLOCK=128]", real(read_twice_kernel), COPY_SIG, {"BLOCK": 128}),
            )
        ]
    raise KeyError(f"no compile spec set {name!r}")


def compile_launches(name: str) -> list:
    """``(op, name, callable)`` launches of the kernels of ``compile_specs(name)`` on CPU tensors, run
    under the compile check's capture (they specialise the specs; nothing is compiled or launched)."""
    import torch

    x32, y32 = torch.empty(4096), torch.empty(4096)
    x16, y16 = torch.empty(4096, dtype=torch.float16), torch.empty(4096, dtype=torch.float16)
    copy = real(copy_kernel)
    if name in ("copy_and_dot", "small_dot"):
        a, b, c = (torch.empty(64 * 64, dtype=torch.float16) for _ in range(3))
        out = [("selftest", "dot 64x64x32", lambda: real(dot_kernel)[(1,)](a, b, c, M=64, N=64, K=32))]
        if name == "copy_and_dot":
            out.append(("selftest", "copy n=4096", lambda: copy[(32,)](x32, y32, 4096, BLOCK=128)))
        return out
    if name == "stages_differ":  # n == 1: the JIT makes it a constexpr
        return [("selftest", "copy n=1", lambda: copy[(1,)](x32, y32, 1, BLOCK=64))]
    if name == "spill":
        return [("selftest", "spill", lambda: real(spill_kernel)[(1,)](x32, y32, BLOCK=16384, num_warps=1))]
    if name == "bad_constexpr":
        return [("selftest", "copy n=1000", lambda: copy[(8,)](x32, y32, 1000, BLOCK=128))]
    if name == "fake_dot":
        return [("selftest", "copy fp16", lambda: copy[(64,)](x16, y16, 4096, BLOCK=64))]
    if name == "pipeline":
        a, b, c = (torch.empty(4 * 64 * 256, dtype=torch.float16) for _ in range(3))
        return [
            (
                "selftest",
                "loop dot",
                lambda: real(loop_dot_kernel)[(1,)](a, b, c, 256, M=64, N=64, BK=32, num_stages=3),
            ),
            (
                "selftest",
                "nested dot",
                lambda: real(nested_loop_dot_kernel)[(1,)](a, b, c, 256, 4, M=64, N=64, BK=32, num_stages=2),
            ),
        ]
    return []


def compile_check_child(request_path: str, reply_path: str) -> None:
    """Run compile-check jobs in this (uninterpreted) process; the tests start it as a subprocess.

    The request is a JSON list of ``[kind, spec set names, archs]`` (the specs of ``compile_specs`` and
    the launches of ``compile_launches`` of each set) with kind ``"check"`` (reply: the
    ``compile_check.results_to_json`` rows) or ``"report"`` (reply: ``{"status", "out"}``, the exit
    status of ``compile_check.report`` and what it printed); the reply list is written as JSON.
    """
    from prompt_kernels.tools import compile_check as cc

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check_child must run without TRITON_INTERPRET=1")
    replies = []
    for kind, sets, archs in json.loads(Path(request_path).read_text()):
        specs = [spec for name in sets for spec in compile_specs(name)]
        launches = [launch for name in sets for launch in compile_launches(name)]
        if kind == "check":
            replies.append(cc.results_to_json(cc.check(specs, tuple(archs), launches=launches)))
        elif kind == "report":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = cc.report(specs, tuple(archs), launches=launches)
            replies.append({"status": status, "out": out.getvalue()})
        else:
            raise ValueError(f"unknown compile-check job {kind!r}")
    Path(reply_path).write_text(json.dumps(replies))


if __name__ == "__main__":
    compile_check_child(*sys.argv[1:])
