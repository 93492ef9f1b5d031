"""Backend selection for the ops: ``auto | triton | cpp | torch``.

Per call, ``auto`` sends CUDA tensors to the Triton kernels and CPU tensors to the C++ extension
(where the op has a C++ kernel and the extension is built), else to the PyTorch reference. The
environment variable ``PROMPT_KERNELS_BACKEND`` or the context manager :func:`use_backend`
overrides it; the context manager wins over the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
ENV_VAR = "PROMPT_KERNELS_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("prompt_kernels_backend", default=None)
_warned_no_cpp: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these tensors."""


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost :func:`use_backend`, else the environment, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (``auto``, ``triton``, ``cpp`` or ``torch``)."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1`` at kernel import)."""
    from prompt_kernels import kernels

    return kernels.interpreting()


def select(op: str, device: torch.device, has_cpp: bool) -> str:
    """Resolve the backend that runs ``op`` on tensors living on ``device``.

    Returns ``"triton"``, ``"cpp"`` or ``"torch"``; raises :class:`BackendUnavailableError` when the
    requested backend cannot run here.
    """
    from prompt_kernels import _cpp

    req = requested_backend()
    dev = device.type
    if req == "auto":
        if dev == "cuda":
            if triton_available():
                return "triton"
            _warn_once(f"{op}: triton is not installed; CUDA tensors run on the PyTorch reference")
            return "torch"
        if dev == "cpu" and has_cpp:
            if _cpp.available():
                return "cpp"
            _warn_once(
                f"prompt_kernels: the C++ extension is not built ({_cpp.import_error()}); CPU ops such as "
                f"{op} run on the slower PyTorch reference. Reinstall with "
                "`pip install --no-build-isolation -e .` to build it."
            )
        return "torch"
    if req == "torch":
        return "torch"
    if req == "cpp":
        if dev != "cpu":
            raise BackendUnavailableError(f"{op}: backend 'cpp' runs on CPU tensors only, got {dev} tensors")
        if not has_cpp:
            raise BackendUnavailableError(f"{op}: backend 'cpp' requested but this op has no C++ kernel")
        if not _cpp.available():
            raise BackendUnavailableError(
                f"{op}: backend 'cpp' requested but the C++ extension is not built ({_cpp.import_error()})"
            )
        return "cpp"
    # triton
    if not triton_available():
        raise BackendUnavailableError(f"{op}: backend 'triton' requested but triton is not installed")
    if dev == "cuda":
        if triton_interpreting():
            raise BackendUnavailableError(
                f"{op}: the Triton kernels were imported with TRITON_INTERPRET=1 and cannot run on CUDA tensors"
            )
        return "triton"
    if dev == "cpu":
        if not triton_interpreting():
            raise BackendUnavailableError(
                f"{op}: backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before prompt_kernels' kernels are first imported"
            )
        return "triton"
    raise BackendUnavailableError(f"{op}: backend 'triton' cannot run on {dev} tensors")


def _warn_once(msg: str) -> None:
    if msg in _warned_no_cpp:
        return
    _warned_no_cpp.add(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
