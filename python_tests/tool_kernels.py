"""Small Triton kernels that exercise the tools (compile check, traffic meter, roofline).

They are plain functions here; :func:`jit` wraps one as a real ``JITFunction`` (for the compile check)
or as an interpreted function (for the traffic meter), whatever ``TRITON_INTERPRET`` says, because the
test session sets ``TRITON_INTERPRET=1`` for the op kernels. They never enter the real registry.
"""

from __future__ import annotations

import os

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
