"""Registry of every Triton kernel configuration, for the compile check and the traffic meter.

Each kernel module registers two things with decorators, so the tools cover new kernels without
being edited:

* ``@register_compile_specs("op")``: a function returning the :class:`CompileSpec` of every
  configuration its launchers can choose (block sizes, head sizes, dtypes, num_warps/num_stages).
* ``@register_launch_cases("op")``: a function returning :class:`LaunchCase` objects that run the
  launcher once on small CPU tensors, with the op's byte and flop floors for that shape. The
  traffic meter and the roofline report run them under ``TRITON_INTERPRET=1``.

The compile check (``prompt_kernels.tools.compile_check``) uses both: it runs every launch case
against a compile-only CUDA target (sm_80, sm_90) so that Triton's JIT computes the launch's
specialisation (16-divisible pointers and integers, integers equal to 1 made constexpr) and
options, then compiles each CompileSpec with the argument values of a launch of the same kernel.
A spec must therefore state the num_warps/num_stages its launcher passes; ``num_stages=None`` means
the launcher passes none (Triton's default, 3 on CUDA).
"""

from __future__ import annotations

import contextlib
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
    num_stages: int | None = None  # None: the launcher passes no num_stages (the JIT's default)
    uses_dot: bool = False  # the kernel's products go through tl.dot (tensor cores expected for fp16/bf16)
    archs: tuple[int, ...] | None = None  # compute capabilities whose launchers choose it (None: all)


@dataclass(frozen=True)
class LaunchCase:
    name: str  # e.g. "phm_linear fwd fp32 x[64,96]->48 n=4"
    op: str
    direction: str  # "forward" or "backward"
    launch: Callable[[], Any]  # runs the launcher(s) once on CPU tensors
    floor_bytes: int  # each input read once, each output written once
    floor_flops: int
    scale_note: str = ""  # how the counts scale to realistic sizes, if they are a formula of the shape


@dataclass(frozen=True)
class KnownFailure:
    """A compile-check failure that is known and not yet fixed: still reported (as ``known``, with the
    reason), but not failing ``make compile-check``. Remove the entry when the kernel is fixed (the
    check warns about entries that no longer match a failure); ``compile_check --strict`` ignores them.

    ``pattern`` matches the compile-check name: ``*`` any text within one bracketed field (no ``,``),
    ``**`` any text; e.g. ``"vq_nearest[*16,BLOCK_M=16,**"`` (fp16 and bf16)."""

    pattern: str
    archs: tuple[int, ...]
    criterion: str  # "spills", "hgmma" (HMMA instead of HGMMA on sm_90) or "async" (stages, no cp.async)
    reason: str


# Found by the compile check once it compiled what launches (the launch specialisation, the
# launchers' num_stages); the tile tables that choose these live in prompt_kernels/kernels/<op>.py.
# Empty since 2026-12-05: the fp32 attention spills, the PHM loops without cp.async and the sm_90
# sampler's HMMA were fixed in the kernels (see benchmarks/notes/<op>.md).
KNOWN_FAILURES: tuple[KnownFailure, ...] = ()


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


def target_arch(device=None) -> int:
    """The compute capability (80, 90, ...) Triton's JIT compiles for: that of ``device`` (or the
    current CUDA device) on a GPU; under the compile check, the architecture being checked.

    Launchers that choose tiles per architecture should ask this (not ``torch.cuda``), so that the
    compile check, which has no GPU, sees the configuration each architecture launches."""
    from triton.runtime import driver

    active = getattr(driver, "_active", None)
    if active is not None and getattr(active, "compile_only", False):
        return int(active.get_current_target().arch)
    import torch

    return int("".join(map(str, torch.cuda.get_device_capability(device))))


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


# ---------------------------------------------------------------------------------------------
# Per-architecture tile tables and autotuning (helpers for the launchers)
#
# A launcher keeps, per architecture, an ordered list of candidate configurations chosen from the
# compile check's facts (registers, spills, shared memory, occupancy, MMA kind, async copies). The
# first candidate is the fixed choice: it is what the Triton interpreter and the compile check
# launch, deterministically. On a real GPU the candidates (2 to 4, all compiled clean by the check)
# are offered to ``triton.autotune``, keyed by the op's sizes; the input dtype is part of Triton's
# autotune key by itself. Every candidate must also be a CompileSpec (each module builds its specs
# from the same tables), so that the gate compiles exactly what can launch.

TABLE_ARCHS = (80, 90)  # architectures with their own rows (the compile check's)
DEFAULT_ARCH = 0  # key of the row every other architecture (and the interpreter) uses
AUTOTUNE_ENV = "PROMPT_KERNELS_AUTOTUNE"  # "0": the fixed configuration on GPUs too


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: the constexpr tile sizes and the launch options, with the reason it
    is in the table (written from the compile check's facts)."""

    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int | None = None  # None: the launcher passes none (the JIT's default, 3 on CUDA)
    reason: str = field(default="", compare=False)

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int | None = None, reason: str = "", **constexprs):
        return cls(tuple(constexprs.items()), num_warps, num_stages, reason)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.constexprs)

    def launch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a plain ``kernel[grid](...)`` launch of this configuration."""
        kw = {**self.kwargs, "num_warps": self.num_warps}
        if self.num_stages is not None:
            kw["num_stages"] = self.num_stages
        return kw

    def triton_config(self):
        import triton

        # num_stages None is the JIT's CUDA default (3): the same compile as a launch that passes none
        return triton.Config(self.kwargs, num_warps=self.num_warps, num_stages=self.num_stages or 3)

    def matches(self, config) -> bool:
        """Whether a ``triton.Config`` (the autotuner's pick) is this configuration."""
        return (
            dict(config.kwargs) == self.kwargs
            and config.num_warps == self.num_warps
            and config.num_stages == (self.num_stages or 3)
        )


def arch_row(table, arch: int):
    """``table[arch]`` for an architecture with its own row, else ``table[DEFAULT_ARCH]``."""
    return table[arch] if arch in table else table[DEFAULT_ARCH]


def compile_only() -> bool:
    """Whether the compile check's compile-only CUDA target is active (no GPU, nothing launches)."""
    from triton.runtime import driver

    active = getattr(driver, "_active", None)
    return bool(active is not None and getattr(active, "compile_only", False))


_interpreter_arch: int | None = None


@contextlib.contextmanager
def interpreter_arch(arch: int):
    """Under the Triton interpreter, launch with ``arch``'s table rows instead of ``DEFAULT_ARCH``'s:
    a launch case (the traffic meter's) that shows what that architecture's tiles issue. No effect
    on GPUs or under the compile check, which launch their own architecture's rows."""
    global _interpreter_arch
    old, _interpreter_arch = _interpreter_arch, int(arch)
    try:
        yield
    finally:
        _interpreter_arch = old


def launch_arch(device=None) -> int:
    """The row of the tile tables a launch uses: ``DEFAULT_ARCH`` under the Triton interpreter (or
    the one ``interpreter_arch`` sets), the checked architecture under the compile check, the
    device's compute capability on a GPU."""
    from prompt_kernels.kernels import interpreting

    if interpreting():
        return DEFAULT_ARCH if _interpreter_arch is None else _interpreter_arch
    if device is not None and getattr(device, "type", "cuda") != "cuda":
        device = None
    return target_arch(device)


def autotune_enabled(device) -> bool:
    """Autotune on real GPUs only: not under the interpreter, not under the compile check (which
    must see the fixed configuration), not with ``PROMPT_KERNELS_AUTOTUNE=0``."""
    import os

    from prompt_kernels.kernels import interpreting

    if interpreting() or compile_only() or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return False
    return getattr(device, "type", None) == "cuda"


class TunedKernel:
    """A ``@triton.jit`` kernel launched with the fixed configuration (interpreter, compile check) or,
    on a GPU, through a ``triton.autotune`` over the candidates (one autotuner per candidate list,
    created on first use; the module-level kernel stays a plain JITFunction, which the compile check
    needs). ``key``: the argument names of the autotune key (the dtype is added by Triton).

    Only for kernels whose outputs are written once and read by nothing in the launch: the
    autotuner runs every candidate on the real arguments while benchmarking, so a kernel that
    accumulates into an output would need ``reset_to_zero`` / ``restore_value`` (none here does)."""

    def __init__(self, kernel, key, reset_to_zero=None, restore_value=None, do_bench=None):
        self.kernel = kernel
        self.key = list(key)
        self.reset_to_zero = reset_to_zero
        self.restore_value = restore_value
        self.do_bench = do_bench  # None: Triton's (the GPU's); tests pass their own
        self.tuners: dict[tuple[TileConfig, ...], Any] = {}

    def tuner(self, candidates):
        import triton

        cands = tuple(candidates)
        t = self.tuners.get(cands)
        if t is None:
            t = triton.autotune(
                configs=[c.triton_config() for c in cands],
                key=self.key,
                reset_to_zero=self.reset_to_zero,
                restore_value=self.restore_value,
                do_bench=self.do_bench,
            )(self.kernel)
            self.tuners[cands] = t
        return t

    def launch(self, grid, candidates, *args, device=None, **kwargs) -> TileConfig:
        """Launch with ``grid(meta)`` (``meta``: the constexprs by name, at least the tile sizes) and
        return the configuration used: the autotuner's pick on a GPU, else ``candidates[0]``."""
        candidates = tuple(candidates)
        if len(candidates) > 1 and autotune_enabled(device):
            t = self.tuner(candidates)
            t[grid](*args, **kwargs)
            best = t.best_config
            return next((c for c in candidates if c.matches(best)), candidates[0])
        cfg = candidates[0]
        self.kernel[grid(cfg.kwargs)](*args, **kwargs, **cfg.launch_kwargs())
        return cfg
