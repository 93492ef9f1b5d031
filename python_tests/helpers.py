"""Shared test helpers: the error-budget comparison against float64 and the backends to test."""

from __future__ import annotations

import os

import pytest
import torch

from prompt_kernels import _cpp, kernels

INTERPRET = kernels.interpreting()
# The device the Triton backend is tested on: CPU tensors under the interpreter, else CUDA.
TRITON_DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
CAN_RUN_TRITON = INTERPRET or torch.cuda.is_available()


def backends(has_cpp: bool) -> list[str]:
    """Backends to test for an op: torch always, cpp when the op has a C++ kernel, triton always
    (under the interpreter on CPU, or on CUDA)."""
    out = ["torch"]
    if has_cpp:
        out.append("cpp")
    out.append("triton")
    return out


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return (a.double() - ref64).abs().max().item() if a.numel() else 0.0


def assert_within_budget(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    *,
    name: str,
    factor: float = 2.0,
    ulps: float = 4.0,
    term_scale: float = 0.0,
) -> None:
    """The error of ``actual`` against the float64 reference may be at most ``factor`` times the error
    of PyTorch's own computation in the same dtype (``torch_same_dtype``), plus a few ulps of the
    output's magnitude (PyTorch is sometimes exact on tiny problems), or of ``term_scale`` when given:
    the largest sum of absolute terms behind one output element (a sum that cancels carries rounding
    errors of the size of its terms, not of its result)."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{name}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (unwritten or invalid)"
    ours = max_err(actual, ref64)
    theirs = max_err(torch_same_dtype, ref64)
    eps = torch.finfo(actual.dtype).eps
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, term_scale)
    budget = factor * theirs + ulps * eps * max(scale, 1e-3)
    assert ours <= budget, f"{name}: error {ours:.3e} > budget {budget:.3e} (torch's own error {theirs:.3e})"


def cpp_built() -> bool:
    return _cpp.available()


def require_cpp_build(backend: str) -> None:
    """The cpp backend's tests fail, not skip, when the extension is missing: `make install` builds it."""
    if backend == "cpp" and not cpp_built():
        pytest.fail("the C++ extension is not built: `make install` builds it; a missing build is a failure")


def skip_reason_triton() -> str | None:
    if not CAN_RUN_TRITON:
        return "no CUDA device and TRITON_INTERPRET is not 1"
    return None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"
