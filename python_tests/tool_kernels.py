"""Small Triton kernels that exercise the tools (compile check, traffic meter, roofline).

They are plain functions here; :func:`jit` wraps one as a real ``JITFunction`` (for the compile check)
or as an interpreted function (for the traffic meter), whatever ``TRITON_INTERPRET`` says, because the
test session sets ``TRITON_INTERPRET=1`` for the op kernels. They never enter the real registry.

The compile-check tests compile in a subprocess without ``TRITON_INTERPRET`` (see
:func:`compile_check_child`): in a process where it was set when Triton was imported, Triton's own
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


def compile_specs(name: str) -> list:
    """A named set of ``(op, CompileSpec)`` of these kernels as real JITFunctions, for the compile check."""
    from prompt_kernels.kernels.registry import CompileSpec

    copy = jit(copy_kernel, interpret=False)
    if name == "copy_and_dot":
        dot = jit(dot_kernel, interpret=False)
        mnk = {"M": 64, "N": 64, "K": 32}
        return [
            ("selftest", CompileSpec("copy[fp32,BLOCK=128]", copy, COPY_SIG, {"BLOCK": 128})),
            ("selftest", CompileSpec("dot[fp16,64x64x32]", dot, DOT_SIG_FP16, mnk, uses_dot=True)),
        ]
    if name == "spill":
        spill = jit(spill_kernel, interpret=False)
        spec = CompileSpec("spill[BLOCK=16384,w1]", spill, SPILL_SIG, {"BLOCK": 16384}, num_warps=1)
        return [("selftest", spec)]
    if name == "missing_constexpr":
        return [("selftest", CompileSpec("copy[missing constexpr]", copy, COPY_SIG, {}))]
    if name == "fake_dot":
        # a copy kernel claiming uses_dot on fp16 data: no HMMA/HGMMA in its SASS
        sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}
        return [("selftest", CompileSpec("fake-dot", copy, sig, {"BLOCK": 64}, uses_dot=True))]
    raise KeyError(f"no compile spec set {name!r}")


def compile_check_child(request_path: str, reply_path: str) -> None:
    """Run compile-check jobs in this (uninterpreted) process; the tests start it as a subprocess.

    The request is a JSON list of ``[kind, spec set names, archs]`` with kind ``"check"`` (reply: the
    ``compile_check.results_to_json`` rows) or ``"report"`` (reply: ``{"status", "out"}``, the exit
    status of ``compile_check.report`` and what it printed); the reply list is written as JSON.
    """
    from prompt_kernels.tools import compile_check as cc

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check_child must run without TRITON_INTERPRET=1")
    replies = []
    for kind, sets, archs in json.loads(Path(request_path).read_text()):
        specs = [spec for name in sets for spec in compile_specs(name)]
        if kind == "check":
            replies.append(cc.results_to_json(cc.check(specs, tuple(archs))))
        elif kind == "report":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = cc.report(specs, tuple(archs))
            replies.append({"status": status, "out": out.getvalue()})
        else:
            raise ValueError(f"unknown compile-check job {kind!r}")
    Path(reply_path).write_text(json.dumps(replies))


if __name__ == "__main__":
    compile_check_child(*sys.argv[1:])
