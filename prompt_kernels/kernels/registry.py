"""Registry of every Triton kernel configuration, for the compile check and the traffic meter.

Each kernel module registers two things with decorators, so the tools cover new kernels without
being edited:

* ``@register_compile_specs("op")``: a function returning the :class:`CompileSpec` of every
  configuration its launchers can choose (block sizes, head sizes, dtypes). The compile check
  compiles each for sm_80 and sm_90 without a GPU.
* ``@register_launch_cases("op")``: a function returning :class:`LaunchCase` objects that run the
  launcher once on small CPU tensors (under ``TRITON_INTERPRET=1``), with the op's byte and flop
  floors for that shape. The traffic meter and the roofline report use them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    name: str  # unique and descriptive, e.g. "phm_linear_fwd[fp16,BM=64,BN=64,BK=32]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # argument -> triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = False  # the kernel's products go through tl.dot (tensor cores expected for fp16/bf16)


@dataclass(frozen=True)
class LaunchCase:
    name: str  # e.g. "phm_linear fwd fp32 x[64,96]->48 n=4"
    op: str
    direction: str  # "forward" or "backward"
    launch: Callable[[], Any]  # runs the launcher(s) once on CPU tensors
    floor_bytes: int  # each input read once, each output written once
    floor_flops: int
    scale_note: str = ""  # how the counts scale to realistic sizes, if they are a formula of the shape


_COMPILE: dict[str, list[Callable[[], list[CompileSpec]]]] = {}
_LAUNCH: dict[str, list[Callable[[], list[LaunchCase]]]] = {}


def register_compile_specs(op: str):
    def deco(fn):
        _COMPILE.setdefault(op, []).append(fn)
        return fn

    return deco


def register_launch_cases(op: str):
    def deco(fn):
        _LAUNCH.setdefault(op, []).append(fn)
        return fn

    return deco


def import_all_kernel_modules() -> None:
    import prompt_kernels.kernels as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "registry" and not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def compile_specs() -> list[CompileSpec]:
    import_all_kernel_modules()
    return [spec for op in sorted(_COMPILE) for fn in _COMPILE[op] for spec in fn()]


def launch_cases() -> list[LaunchCase]:
    import_all_kernel_modules()
    return [case for op in sorted(_LAUNCH) for fn in _LAUNCH[op] for case in fn()]
