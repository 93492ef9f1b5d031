"""Access to the C++ CPU kernels built from ``csrc/`` (``torch.ops.prompt_kernels_cpp``)."""

from __future__ import annotations

import torch

_error: str | None = None
try:
    from prompt_kernels import _C  # noqa: F401  (loading it registers the ops)
except ImportError as exc:  # extension not built: the package still works on the reference
    _error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    return _error is None


def import_error() -> str | None:
    return _error


def op(name: str):
    """The C++ op ``torch.ops.prompt_kernels_cpp.<name>``."""
    return getattr(torch.ops.prompt_kernels_cpp, name)


def has(name: str) -> bool:
    return available() and hasattr(torch.ops.prompt_kernels_cpp, name)
