"""Compile what the launchers launch, for sm_80 and sm_90, without a GPU, and check the machine code.

Run as ``python -m prompt_kernels.tools.compile_check [--arch 80 90] [--filter TEXT] [--jobs N]
[--json PATH] [--markdown] [--sass]``.

**What is compiled.** Triton's JIT does not compile a kernel as declared: at launch it specialises
it to the argument values (``tt.divisibility = 16`` on pointers and integers divisible by 16,
integers equal to 1 made constexpr) and to the launch options (``num_warps``, ``num_stages``, with
the backend's defaults for those not passed). To compile exactly that, the check

1. runs every registered :class:`~prompt_kernels.kernels.registry.LaunchCase` (the real launchers on
   small CPU tensors) against a compile-only CUDA target of each architecture: Triton's own
   ``JITFunction.run`` binds the arguments and computes the specialisation and options, and
   ``knobs.runtime.jit_cache_hook`` takes them and skips the compile and the launch;
2. for every :class:`~prompt_kernels.kernels.registry.CompileSpec` (the configurations a launcher
   can choose), re-runs ``JITFunction.run`` the same way with the arguments of a captured launch of
   the same kernel, its constexprs and pointer dtypes replaced by the spec's and the spec's
   ``num_warps``/``num_stages`` (``None``: the JIT's default). Where a launch case launched the
   spec's configuration itself, that launch is what is compiled, and launch options that differ
   from the spec's are a failure;
3. compiles each distinct ``(kernel, signature, constexprs, attrs, options)`` with
   ``triton.compile`` (as ``JITFunction._do_compile`` does), in a process pool.

**What is read.** Registers and spills from the ``ptxas -v`` log of Triton's own ``ptxas`` run
(``knobs.nvidia.dump_ptxas_log``; when Triton's cache already had the kernel, ``ptxas -v`` is re-run
on the PTX with the ptxas that Triton's NVIDIA backend picks for the architecture, and the result
cached next to Triton's cache), shared memory from the metadata, the ``tl.dot`` operand types and the
loops from the TTIR, the MMA instructions (``mma.sync`` = HMMA, ``wgmma.mma_async`` = HGMMA) and the
asynchronous copies (``cp.async`` = LDGSTS, ``cp.async.bulk.tensor`` = TMA, other ``cp.async.bulk``)
from the PTX, and with ``--sass`` also the tensor-core opcodes of the SASS (``cuobjdump -sass``).

**What fails.** A compile error; any spill; a configuration that does not fit one SM; a ``tl.dot``
on tensor-core inputs (fp16, bf16, fp8, int8, or fp32 in a TF32 precision) without MMA instructions,
or on sm_90 with HMMA instead of HGMMA; a loop with loads feeding a ``tl.dot`` compiled with
``num_stages >= 2`` and no asynchronous copy (stages asked for, no pipeline built); launch options
that differ from the registered spec's; a spec whose kernel no launch case launches (its launch
specialisation is unknown).

The kernels must be real ``JITFunction`` objects: when ``TRITON_INTERPRET=1`` is set, ``main`` re-runs
itself in a subprocess without it. Supported Triton versions: see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHS = (80, 90)

# Per-SM limits used for the theoretical occupancy (CUDA occupancy calculator rules).
REGS_PER_SM = 65536
REG_ALLOC_UNIT_PER_WARP = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SMEM_MAX_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}  # opt-in maximum for one block
SMEM_RESERVED_PER_BLOCK = 1024

TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "WGMMA", "GMMA", "UTCMMA")
_TC_RE = re.compile(r"\b(" + "|".join(TENSOR_CORE_OPS) + r")\b[.\w]*")

# PTX instruction -> SASS family
_PTX_MMA = (("HGMMA", re.compile(r"\bwgmma\.mma_async[\w.:]*")), ("HMMA", re.compile(r"\bmma\.sync[\w.:]*")))
_PTX_ASYNC = (
    ("cp.async", re.compile(r"\bcp\.async\.c[ag]\.shared")),
    ("TMA", re.compile(r"\bcp\.async\.bulk\.tensor\b")),
    ("bulk", re.compile(r"\bcp\.async\.bulk\.(?:shared|global)")),
)
# tl.dot operand element types (TTIR) that run on tensor cores whatever the precision
_TC_TYPES = ("f16", "bf16", "i8", "f8")


# ---------------------------------------------------------------------------------------------
# The NVIDIA tools Triton's backend uses


@dataclass(frozen=True)
class Tool:
    path: str
    version: str  # CUDA release, e.g. "12.8"


def ptxas_tool(arch: int) -> Tool:
    """The ptxas Triton's NVIDIA backend assembles ``arch`` with (its PTX ``.version`` is chosen
    from this ptxas's version, so no other ptxas is sure to accept it)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(arch)
        except TypeError:  # a backend whose get_ptxas takes no architecture
            tool = get_ptxas()
    except ImportError:
        from triton import knobs

        tool = knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
    return Tool(str(tool.path), str(tool.version))


def cuobjdump_tool() -> Tool:
    from triton import knobs

    tool = knobs.nvidia.cuobjdump
    return Tool(str(tool.path), str(tool.version))


def sm_arch(arch: int) -> str:
    """The ``--gpu-name`` Triton gives ptxas: sm_80, sm_90a."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def toolchain_summary(archs: Iterable[int]) -> str:
    import triton

    parts = [f"triton {triton.__version__}"]
    for arch in archs:
        try:
            t = ptxas_tool(arch)
            parts.append(f"sm_{arch}: ptxas {t.version} ({t.path})")
        except Exception as e:  # reported, the compiles will fail with the reason
            parts.append(f"sm_{arch}: no ptxas ({type(e).__name__}: {e})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# ptxas log, PTX, TTIR, SASS


@dataclass
class PtxasInfo:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def parse_ptxas_log(log: str) -> PtxasInfo:
    """Parse ``ptxas -v`` output; with several functions, registers are the maximum and spills the sum.

    Example lines::

        ptxas info    : Function properties for mm
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 128 registers, used 1 barriers, 408 bytes cmem[0]
    """
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    if not regs:
        raise ValueError(f"no 'Used N registers' line in ptxas output:\n{log}")
    stores = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(m) for m in re.findall(r"(\d+) bytes spill loads", log)]
    stack = [int(m) for m in re.findall(r"(\d+) bytes stack frame", log)]
    return PtxasInfo(max(regs), sum(stores), sum(loads), max(stack, default=0))


def _ptxas_flags(arch: int, enable_fp_fusion: bool, ptx_options: str | None) -> list[str]:
    """Triton's ptxas flags (``CUDABackend.make_cubin``) plus ``-v``."""
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not enable_fp_fusion:
        flags.append("--fmad=false")
    if ptx_options:
        flags += ptx_options.split(" ")
    return [*flags, f"--gpu-name={sm_arch(arch)}"]


def run_ptxas(
    ptx: str, arch: int, enable_fp_fusion: bool = True, ptx_options: str | None = None
) -> tuple[PtxasInfo, str]:
    """Assemble ``ptx`` with Triton's ptxas for ``arch`` and its flags; return the info and the log."""
    tool = ptxas_tool(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [tool.path, *_ptxas_flags(arch, enable_fp_fusion, ptx_options), str(src)]
        proc = subprocess.run([*cmd, "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas {tool.version} ({tool.path}) failed ({proc.returncode}):\n{log}")
    return parse_ptxas_log(log), log


def sass_of(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([cuobjdump_tool().path, "-sass", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuobjdump failed:\n{proc.stderr}")
        return proc.stdout


def tensor_core_instructions(sass: str) -> list[str]:
    """Distinct tensor-core opcodes in the SASS, e.g. ``["HMMA.16816.F32"]`` or ``["HGMMA.64x64x16.F32"]``."""
    return sorted({m.group(0) for m in _TC_RE.finditer(sass)})


def ptx_facts(ptx: str) -> dict:
    """MMA kind and instructions, asynchronous copies (static instruction counts) of a PTX module."""
    mma_ops = sorted({m.group(0) for _, rx in _PTX_MMA for m in rx.finditer(ptx)})
    kind = next((name for name, rx in _PTX_MMA if rx.search(ptx)), "")
    copies = {name: len(rx.findall(ptx)) for name, rx in _PTX_ASYNC}
    return {"mma_kind": kind, "mma_ops": mma_ops, "async_copies": {k: v for k, v in copies.items() if v}}


def ttir_facts(ttir: str) -> dict:
    """The ``tl.dot`` operations (``"<lhs element type>/<input precision>"``), whether one needs tensor
    cores, and whether a loop holds both loads and a ``tl.dot`` (what ``num_stages`` pipelines)."""
    dots, tensor_core = [], False
    pipelined = False
    loops: list[tuple[int, dict]] = []  # (brace depth at the loop's opening, seen ops)
    depth = 0
    for line in ttir.splitlines():
        code = line.split(" loc(")[0]
        is_dot = re.search(r"\btt\.dot(?:_scaled)?\b", code) is not None
        is_load = re.search(r"\btt\.(?:load|descriptor_load)\b", code) is not None
        if is_dot:
            types = re.findall(r"tensor<(?:\d+x)+([A-Za-z0-9]+)", code)
            prec = re.search(r"inputPrecision = (\w+)", code)
            lhs = types[0] if types else "?"
            precision = prec.group(1) if prec else "ieee"  # the attribute is printed unless IEEE
            dots.append(f"{lhs}/{precision}" if lhs == "f32" else lhs)
            if lhs.startswith(_TC_TYPES) or (lhs == "f32" and precision != "ieee"):
                tensor_core = True
        for _, seen in loops:
            seen["dot"] |= is_dot
            seen["load"] |= is_load
        opens, closes = code.count("{"), code.count("}")
        if re.search(r"\bscf\.for\b", code) and code.rstrip().endswith("{"):
            loops.append((depth, {"dot": False, "load": False}))
        depth += opens - closes
        while loops and depth <= loops[-1][0]:
            _, seen = loops.pop()
            pipelined |= seen["dot"] and seen["load"]
    return {"dots": sorted(set(dots)), "tensor_core_dot": tensor_core, "dot_loop": pipelined}


# ---------------------------------------------------------------------------------------------
# Occupancy


@dataclass
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # of MAX_WARPS_PER_SM
    limiter: str  # "registers", "shared", "warps", "blocks" or "does not fit"


def occupancy(arch: int, num_warps: int, registers: int, shared_bytes: int) -> Occupancy:
    """Theoretical occupancy of one kernel configuration on one SM."""
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT_PER_WARP) * REG_ALLOC_UNIT_PER_WARP
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    if shared_bytes > 0:
        limits["shared"] = SMEM_PER_SM[arch] // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    if shared_bytes > SMEM_MAX_PER_BLOCK[arch] or registers > 255:
        return Occupancy(0, 0, 0.0, "does not fit")
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    warps = blocks * num_warps
    return Occupancy(blocks, warps, warps / MAX_WARPS_PER_SM, limiter if blocks > 0 else "does not fit")


# ---------------------------------------------------------------------------------------------
# Capturing launches: Triton's JIT specialises, a compile-only target stops it before compiling


class CompileOnlyDriver:
    """Stands in for Triton's active driver: a CUDA target of one architecture, no device.

    ``JITFunction.run`` asks it for the target (to make the backend that parses the options and
    the binder that specialises the arguments), a device (the key of its per-device caches) and a
    stream; the compile and the launch never happen (the cache hook refuses them)."""

    compile_only = True

    def __init__(self, arch: int):
        self.arch = arch
        self.device = f"compile_check:sm_{arch}"

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return False


@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call as Triton's JIT would compile it for ``arch``."""

    kernel: Any  # the JITFunction
    arch: int
    args: tuple
    kwargs: dict  # the call's keyword arguments (constexprs passed by name, launch options)
    grid: Any
    origin: str  # the launch case (or spec) that made the call
    signature: dict = field(default_factory=dict)  # from the JIT: name -> type, "constexpr" for =1 ints
    constexprs: dict = field(default_factory=dict)  # (index,) -> value
    attrs: dict = field(default_factory=dict)  # (index,) -> [["tt.divisibility", 16]]
    options: dict = field(default_factory=dict)  # the backend's parsed options
    error: str = ""

    def bound(self) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults applied."""
        params = {p.name for p in self.kernel.params}
        sig = inspect.signature(self.kernel.fn)
        b = sig.bind(*self.args, **{k: v for k, v in self.kwargs.items() if k in params})
        b.apply_defaults()
        return dict(b.arguments)

    def launch_options(self) -> dict:
        params = {p.name for p in self.kernel.params}
        return {k: v for k, v in self.kwargs.items() if k not in params}

    def config(self) -> tuple[dict, dict]:
        """(tl.constexpr parameter values, pointer parameter types) of this launch."""
        bound = self.bound()
        consts = {p.name: bound[p.name] for p in self.kernel.params if p.is_constexpr}
        ptrs = {k: v for k, v in self.signature.items() if isinstance(v, str) and v.startswith("*")}
        return consts, ptrs

    def specialisation(self) -> str:
        """Short text: which non-constexpr arguments were specialised, e.g. ``div16 12/14, =1 stride_xk``."""
        names = [p.name for p in self.kernel.params]
        ones = [names[k[0]] for k in self.constexprs if not self.kernel.params[k[0]].is_constexpr]
        runtime = [p for p in self.kernel.params if not p.is_constexpr and p.name not in ones]
        div = sum(1 for p in runtime if ["tt.divisibility", 16] in _as_lists(self.attrs.get((p.num,), [])))
        text = f"div16 {div}/{len(runtime)}"
        return text + (f", =1 {' '.join(ones)}" if ones else "")


def _as_lists(v):
    return [list(x) for x in v] if isinstance(v, list | tuple) else []


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@contextlib.contextmanager
def capture_launches(arch: int, sink: list[Launch], origin: Callable[[], str]):
    """While active, ``kernel[grid](...)`` records a :class:`Launch` in ``sink`` (Triton's specialisation
    and options for ``arch``) instead of compiling and launching; ``origin()`` names the caller."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    fake = CompileOnlyDriver(arch)
    old_active = getattr(driver, "_active", None)
    old_hook = knobs.runtime.jit_cache_hook
    original_run = JITFunction.run
    calls: list[Launch] = []
    touched: list = []

    def run(self, *args, grid, warmup, **kwargs):
        call = Launch(self, arch, args, dict(kwargs), grid, origin())
        calls.append(call)
        if self not in touched:
            touched.append(self)
        try:
            original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
            if not call.signature:
                call.error = "the JIT compiled nothing (no cache hook call)"
        except Exception as e:
            call.error = f"{type(e).__name__}: {e}"
        finally:
            calls.pop()
            sink.append(call)
        return None

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        call = calls[-1]
        call.signature = dict(compile["signature"])
        call.constexprs = dict(compile["constants"])
        call.attrs = dict(compile["configs"][0])
        options = json.loads(compile["specialization_data"])["options"]
        call.options = {k: _tuples(v) for k, v in options.items()}
        return True  # compiled: nothing; launched: nothing

    driver.set_active(fake)
    knobs.runtime.jit_cache_hook = hook
    JITFunction.run = run
    try:
        yield sink
    finally:
        JITFunction.run = original_run
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_active
        for fn in touched:
            fn.device_caches.pop(fake.device, None)


# ---------------------------------------------------------------------------------------------
# What to compile


@dataclass
class Entry:
    """One compile: a kernel specialised as the JIT would for one architecture."""

    name: str
    op: str
    arch: int
    launch: Launch
    claims_dot: bool = False
    problems: list[str] = field(default_factory=list)  # failures found before compiling

    def key(self) -> str:
        L = self.launch
        fn = getattr(L.kernel, "fn", L.kernel)
        parts = (
            f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}",
            self.arch,
            sorted(L.signature.items()),
            sorted((k, repr(v)) for k, v in L.constexprs.items()),
            sorted((k, repr(v)) for k, v in L.attrs.items()),
            sorted((k, repr(v)) for k, v in L.options.items()),
        )
        return repr(parts)


_TORCH_DTYPES = {
    "fp64": "float64",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "i1": "bool",
    "i8": "int8",
    "u8": "uint8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
}


def _stand_in(value, triton_type: str):
    """A tensor of the pointer type ``triton_type`` ("*fp16") with ``value``'s 16-byte alignment class."""
    import torch

    dt = getattr(torch, _TORCH_DTYPES[triton_type.lstrip("*")])
    t = torch.empty(64, dtype=dt)
    aligned = not hasattr(value, "data_ptr") or value.data_ptr() % 16 == 0
    return t if aligned else t[1:]


def _spec_config(spec) -> tuple[dict, dict]:
    ptrs = {k: v for k, v in spec.signature.items() if isinstance(v, str) and v.startswith("*")}
    return dict(spec.constexprs), ptrs


def _matches(launch_cfg, spec_cfg) -> tuple[bool, int]:
    """(the launch has the spec's configuration, similarity score for choosing a template)."""
    (lc, lp), (sc, sp) = launch_cfg, spec_cfg
    same_c = sum(1 for k, v in sc.items() if k in lc and lc[k] == v)
    same_p = sum(1 for k, v in sp.items() if lp.get(k) == v)
    exact = same_c == len(sc) and same_p == len(sp)
    return exact, 2 * same_p + same_c


def _default_options(arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32)).parse_options({}).__dict__


def _launch_name(op: str, launch: Launch) -> str:
    consts, ptrs = launch.config()
    dtype = next(iter(ptrs.values()), "").lstrip("*")
    inner = ",".join([dtype] + [f"{k}={v}" for k, v in consts.items()])
    return f"{launch.kernel.fn.__name__.strip('_')}[{inner}]"


def _op_of_origin(origin: str, default: str = "") -> str:
    return origin.split(":", 1)[0] if ":" in origin else default


def build_entries(specs, launches, archs=ARCHS) -> tuple[list[Entry], list[str]]:
    """The compiles for ``specs`` (``(op, CompileSpec)``) and the launch callables ``launches``
    (``(op, name, callable)``): every distinct launch of every launch case, and every spec not
    launched as such, specialised with the arguments of a launch of its kernel. Returns the entries
    and the launch cases that failed to run."""
    entries: list[Entry] = []
    broken: list[str] = []
    for arch in archs:
        captured: list[Launch] = []
        current = {"origin": ""}
        with capture_launches(arch, captured, lambda c=current: c["origin"]):
            for op, name, fn in launches:
                current["origin"] = f"{op}: {name}"
                try:
                    fn()
                except Exception as e:
                    if arch == archs[0]:
                        broken.append(f"launch case {name!r} failed: {type(e).__name__}: {e}")
        good = [c for c in captured if not c.error]
        broken += [f"sm_{arch} launch {c.origin}: {c.error}" for c in captured if c.error]
        by_kernel: dict[int, list[Launch]] = {}
        for c in good:
            by_kernel.setdefault(id(c.kernel), []).append(c)
        defaults = _default_options(arch)
        used: set[int] = set()
        arch_entries: list[Entry] = []
        for op, spec in specs:
            if spec.archs is not None and arch not in spec.archs:
                continue
            want_stages = spec.num_stages if spec.num_stages is not None else defaults["num_stages"]
            cfg = _spec_config(spec)
            candidates = by_kernel.get(id(spec.kernel), [])
            scored = [(c, *_matches(c.config(), cfg)) for c in candidates]
            exact = [c for c, ok, _ in scored if ok]
            if exact:
                for i, c in enumerate(exact):
                    used.add(id(c))
                    e = Entry(spec.name + (f" #{i + 1}" if i else ""), op, arch, c, spec.uses_dot)
                    got = (c.options.get("num_warps"), c.options.get("num_stages"))
                    if got != (spec.num_warps, want_stages):
                        e.problems.append(
                            f"launched with num_warps={got[0]}, num_stages={got[1]} ({c.origin}); the "
                            f"spec says {spec.num_warps}, {spec.num_stages} (JIT default {defaults['num_stages']})"
                        )
                    arch_entries.append(e)
                continue
            if not candidates:
                e = Entry(spec.name, op, arch, _declared_launch(spec, arch), spec.uses_dot)
                e.problems.append(
                    f"no launch case launches {spec.kernel.fn.__name__}: compiled as declared, without the "
                    "launch specialisation"
                )
                arch_entries.append(e)
                continue
            template = max(scored, key=lambda t: t[2])[0]
            arch_entries.append(_rebind(spec, op, arch, template))
        for c in good:
            if id(c) not in used:
                op = _op_of_origin(c.origin)
                arch_entries.append(Entry(_launch_name(op, c) + " (launch case)", op, arch, c))
        seen: dict[str, Entry] = {}
        for e in arch_entries:
            k = e.key()
            if k in seen:
                seen[k].problems += [p for p in e.problems if p not in seen[k].problems]
                continue
            seen[k] = e
            entries.append(e)
    return entries, broken


def _declared_launch(spec, arch: int) -> Launch:
    """The spec compiled as declared (no specialisation): for kernels that no launch case launches."""
    consts = {(spec.kernel.arg_names.index(k),): v for k, v in spec.constexprs.items()}
    options = _default_options(arch)
    options["num_warps"] = spec.num_warps
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    return Launch(
        spec.kernel, arch, (), {}, None, "declared", dict(spec.signature), consts, {}, options=options
    )


def _rebind(spec, op: str, arch: int, template: Launch) -> Entry:
    """``spec`` launched through the JIT with ``template``'s argument values (its constexprs and
    pointer dtypes replaced by the spec's) and the spec's num_warps/num_stages."""
    bound = template.bound()
    for k, v in spec.constexprs.items():
        bound[k] = v
    for k, t in spec.signature.items():
        if isinstance(t, str) and t.startswith("*") and template.signature.get(k) != t and k in bound:
            bound[k] = _stand_in(bound[k], t)
    options = {k: v for k, v in template.launch_options().items() if k not in ("num_warps", "num_stages")}
    options["num_warps"] = spec.num_warps
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    out: list[Launch] = []
    with capture_launches(arch, out, lambda: f"{op}: {spec.name} (args of {template.origin})"):
        spec.kernel[template.grid](*[bound[p.name] for p in spec.kernel.params], **options)
    (launch,) = out
    e = Entry(spec.name, op, arch, launch, spec.uses_dot)
    if launch.error:
        e.problems.append(f"the JIT refused the spec's launch: {launch.error}")
    return e


# ---------------------------------------------------------------------------------------------
# Compiling one entry


@dataclass
class CompileResult:
    name: str
    op: str
    arch: int
    num_warps: int
    num_stages: int
    kernel: str = ""
    origin: str = ""
    specialisation: str = ""
    ok: bool = False
    error: str = ""
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy: float = 0.0
    occupancy_limiter: str = ""
    dots: list[str] = field(default_factory=list)  # tl.dot lhs element types ("f16", "f32/ieee")
    tensor_core_dot: bool = False  # a tl.dot whose inputs run on tensor cores
    claims_dot: bool = False  # the spec says uses_dot
    mma_kind: str = ""  # "HGMMA", "HMMA" or "" (none), from the PTX
    mma_ops: list[str] = field(default_factory=list)
    sass_mma: list[str] = field(default_factory=list)  # with --sass: tensor-core opcodes of the SASS
    async_copies: dict[str, int] = field(default_factory=dict)  # {"cp.async": n, "TMA": n, "bulk": n}
    dot_loop: bool = False  # a loop with loads feeding a tl.dot (pipelined when num_stages >= 2)
    problems: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # failures matched by a KnownFailure: "failure -- reason"
    seconds: float = 0.0

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def n_async(self) -> int:
        return sum(self.async_copies.values())

    @property
    def expected_mma(self) -> str:
        if not self.tensor_core_dot:
            return ""
        return "HGMMA" if self.arch >= 90 else "HMMA"

    @property
    def tensor_cores(self) -> str:
        """ "yes" (MMA instructions), "no" (a tensor-core tl.dot without them), "FMA" (fp32 IEEE dots
        only), "–" (no tl.dot)."""
        if self.mma_kind:
            return "yes"
        if self.tensor_core_dot:
            return "no"
        return "FMA" if self.dots else "–"

    def failures(self) -> list[str]:
        """Why this result fails the check (empty when it passes)."""
        out = list(self.problems)
        if not self.ok:
            last = self.error.strip().splitlines()[-1] if self.error.strip() else "?"
            return [*out, f"compile error: {last}"]
        if self.spill_bytes:
            out.append(f"spills {self.spill_store_bytes} B stored / {self.spill_load_bytes} B loaded")
        if self.occupancy_limiter == "does not fit":
            out.append(f"does not fit one SM ({self.registers} regs, {self.shared_bytes} B shared)")
        want = self.expected_mma
        if want and self.mma_kind != want:
            got = f"{self.mma_kind} only" if self.mma_kind else "no MMA instruction"
            out.append(f"tl.dot on {'/'.join(self.dots)} needs {want} on sm_{self.arch}: {got}")
        if self.claims_dot and not self.dots:
            out.append("the spec says uses_dot but the kernel compiles no tl.dot")
        if self.dot_loop and self.num_stages >= 2 and not self.n_async:
            out.append(f"num_stages={self.num_stages} but the tl.dot loop has no asynchronous copy")
        return out

    def open_failures(self) -> list[str]:
        """The failures no KnownFailure covers (these fail the check)."""
        known = {k.split(" -- ")[0] for k in self.known}
        return [f for f in self.failures() if f not in known]

    @property
    def verdict(self) -> str:
        return "FAIL" if self.open_failures() else ("known" if self.failures() else "ok")


_CRITERIA = {"spills": "spills ", "hgmma": "needs HGMMA", "async": "asynchronous copy"}


def _glob(pattern: str) -> re.Pattern:
    """``*``: any text without ``,``, ``[`` or ``]``; ``**``: any text."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + r"[^,\[\]]*", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def apply_known_failures(results: list[CompileResult], known) -> list[str]:
    """Mark the failures that a :class:`~prompt_kernels.kernels.registry.KnownFailure` covers (in
    ``result.known``); return warnings for entries that match a compiled name but no failure."""
    warnings = []
    for k in known:
        rx, needle = _glob(k.pattern), _CRITERIA.get(k.criterion, k.criterion)
        named = [r for r in results if r.arch in k.archs and rx.fullmatch(r.name)]
        hit = False
        for r in named:
            for f in r.failures():
                if needle in f:
                    r.known.append(f"{f} -- {k.reason}")
                    hit = True
        if named and not hit:
            warnings.append(
                f"known failure {k.pattern!r} ({k.criterion}, sm_{'/'.join(map(str, k.archs))}) no longer "
                "fails: remove it from registry.KNOWN_FAILURES"
            )
    return warnings


def _facts_cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR")
    if not base:
        try:
            from triton import knobs

            base = knobs.cache.dir
        except Exception:
            base = str(Path.home() / ".triton" / "cache")
    return Path(base) / "prompt_kernels_compile_check"


def _ptxas_facts(ptx: str, arch: int, fusion: bool, ptx_options, log: str | None) -> dict:
    """Registers and spills: from Triton's own ``ptxas -v`` log when this compile ran ptxas, else
    cached by the PTX's hash, else from a ``ptxas -v`` run here (Triton's cache keeps no log)."""
    tool = ptxas_tool(arch)
    flags = " ".join(_ptxas_flags(arch, fusion, ptx_options))
    key = hashlib.sha256(f"{tool.path}|{tool.version}|{flags}|".encode() + ptx.encode()).hexdigest()
    path = _facts_cache_dir() / f"{key}.json"
    info = None
    if log and "Used" in log:
        info = parse_ptxas_log(log)
    else:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            info, _ = run_ptxas(ptx, arch, fusion, ptx_options)
    facts = {
        "registers": info.registers,
        "spill_store_bytes": info.spill_store_bytes,
        "spill_load_bytes": info.spill_load_bytes,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(path)
    except OSError:
        pass
    return facts


def _compile_capturing_ptxas_log(src, target, options: dict):
    """``triton.compile`` with Triton's ``ptxas -v`` log captured (None when the cache had the kernel)."""
    import triton
    from triton import knobs

    out = io.StringIO()
    try:
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
    except AttributeError:
        old = None
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=target, options=options)
    except Exception:
        msg = out.getvalue()
        if msg.strip():
            sys.stderr.write(msg[-4000:])
        raise
    finally:
        if old is not None:
            knobs.nvidia.dump_ptxas_log = old
    return compiled, out.getvalue()


def compile_entry(entry: Entry, sass: bool = False) -> CompileResult:
    """Compile one entry as ``JITFunction._do_compile`` would and read its machine-code facts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    L = entry.launch
    res = CompileResult(
        name=entry.name,
        op=entry.op,
        arch=entry.arch,
        num_warps=int(L.options.get("num_warps", 0)),
        num_stages=int(L.options.get("num_stages", 0)),
        kernel=getattr(getattr(L.kernel, "fn", None), "__name__", str(L.kernel)),
        origin=L.origin,
        claims_dot=entry.claims_dot,
        problems=list(entry.problems),
    )
    t0 = time.perf_counter()
    try:
        if not isinstance(L.kernel, JITFunction):
            raise TypeError(
                f"{entry.name}: kernel is {type(L.kernel).__name__}, not a JITFunction "
                "(was TRITON_INTERPRET=1 set when the kernels were imported?)"
            )
        res.specialisation = L.specialisation() if L.origin != "declared" else "none (declared)"
        src = ASTSource(L.kernel, dict(L.signature), dict(L.constexprs), dict(L.attrs))
        compiled, log = _compile_capturing_ptxas_log(src, GPUTarget("cuda", entry.arch, 32), dict(L.options))
        md = compiled.metadata
        facts = _ptxas_facts(compiled.asm["ptx"], entry.arch, md.enable_fp_fusion, md.ptx_options, log)
        res.registers = facts["registers"]
        res.spill_store_bytes = facts["spill_store_bytes"]
        res.spill_load_bytes = facts["spill_load_bytes"]
        res.shared_bytes = int(md.shared)
        p = ptx_facts(compiled.asm["ptx"])
        res.mma_kind, res.mma_ops, res.async_copies = p["mma_kind"], p["mma_ops"], p["async_copies"]
        t = ttir_facts(compiled.asm["ttir"])
        res.dots, res.tensor_core_dot, res.dot_loop = t["dots"], t["tensor_core_dot"], t["dot_loop"]
        if sass:
            res.sass_mma = tensor_core_instructions(sass_of(compiled.asm["cubin"]))
        occ = occupancy(entry.arch, res.num_warps, res.registers, res.shared_bytes)
        res.blocks_per_sm, res.warps_per_sm = occ.blocks_per_sm, occ.warps_per_sm
        res.occupancy, res.occupancy_limiter = occ.fraction, occ.limiter
        res.ok = True
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# Driving it


def registered_specs() -> list[tuple[str, object]]:
    """``(op, spec)`` for every registered CompileSpec, in the registry's order."""
    from prompt_kernels.kernels import registry

    registry.import_all_kernel_modules()
    return [(op, spec) for op in sorted(registry._COMPILE) for fn in registry._COMPILE[op] for spec in fn()]


def registered_launches() -> list[tuple[str, str, Callable]]:
    """``(op, name, launch)`` for every registered LaunchCase; ``op`` is the op it is registered under
    (as for the CompileSpecs; the case's own ``op`` may be finer, e.g. ``vq_nearest``)."""
    from prompt_kernels.kernels import registry

    registry.import_all_kernel_modules()
    return [
        (op, c.name, c.launch) for op in sorted(registry._LAUNCH) for fn in registry._LAUNCH[op] for c in fn()
    ]


def _registered_known_failures():
    from prompt_kernels.kernels import registry

    return getattr(registry, "KNOWN_FAILURES", ())


_POOL_ENTRIES: list[Entry] = []
_POOL_SASS = False


def _compile_task(i: int) -> tuple[int, CompileResult]:
    return i, compile_entry(_POOL_ENTRIES[i], _POOL_SASS)


def _cost(entry: Entry) -> int:
    """Rough compile cost, to start the slow compiles first."""
    try:
        n = len(entry.launch.kernel.src)
    except Exception:
        n = 0
    return n * max(1, int(entry.launch.options.get("num_stages", 1)))


def check(
    specs,
    archs=ARCHS,
    jobs: int = 1,
    progress=None,
    launches=None,
    sass: bool = False,
    problems_out: list | None = None,
    only: str | None = None,
) -> list[CompileResult]:
    """Compile what launches for every arch (see the module docstring). ``specs``: ``(op, CompileSpec)``;
    ``launches``: ``(op, name, callable)``, default none. ``jobs > 1`` uses a forked process pool.
    ``progress(done, total, result)`` is called after each compile; launch cases that failed to run
    are appended to ``problems_out``; ``only``: compile only the entries whose name or op contains it."""
    entries, broken = build_entries(list(specs), list(launches or []), tuple(archs))
    if only:
        entries = [e for e in entries if only in e.name or only in e.op]
    if problems_out is not None:
        problems_out.extend(broken)
    total = len(entries)
    results: list[CompileResult | None] = [None] * total
    order = sorted(range(total), key=lambda i: -_cost(entries[i]))
    done = 0
    if jobs <= 1 or total < 2:
        for i in order:
            results[i] = compile_entry(entries[i], sass)
            done += 1
            if progress:
                progress(done, total, results[i])
        return results  # type: ignore[return-value]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    global _POOL_ENTRIES, _POOL_SASS
    _POOL_ENTRIES, _POOL_SASS = entries, sass
    with ProcessPoolExecutor(max_workers=min(jobs, total), mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(_compile_task, i) for i in order]
        for fut in as_completed(futures):
            i, res = fut.result()
            results[i] = res
            done += 1
            if progress:
                progress(done, total, res)
    return results  # type: ignore[return-value]


def _async_text(r: CompileResult) -> str:
    if not r.async_copies:
        return "0"
    return " ".join(f"{k} {v}" for k, v in r.async_copies.items())


def _mma_text(r: CompileResult) -> str:
    if r.mma_kind:
        return r.mma_kind
    if r.tensor_core_dot:
        return "NONE"
    return "FMA" if r.dots else "–"


TABLE_HEADER = (
    "name",
    "arch",
    "warps",
    "stages",
    "regs",
    "spill B",
    "smem B",
    "blocks/SM",
    "occupancy",
    "MMA",
    "async copies",
    "result",
)


def table_rows(results: list[CompileResult]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        verdict = r.verdict
        if not r.ok:
            rows.append(
                (r.name, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages))
                + ("ERR",)
                + ("",) * 6
                + (verdict,)
            )
            continue
        rows.append(
            (
                r.name,
                f"sm_{r.arch}",
                str(r.num_warps),
                str(r.num_stages),
                str(r.registers),
                str(r.spill_bytes),
                str(r.shared_bytes),
                f"{r.blocks_per_sm} ({r.occupancy_limiter})",
                f"{r.occupancy:.0%}",
                _mma_text(r),
                _async_text(r),
                verdict,
            )
        )
    return rows


def format_table(results: list[CompileResult], markdown: bool = False) -> str:
    rows = [TABLE_HEADER, *table_rows(results)]
    if markdown:
        lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join("---" for _ in TABLE_HEADER) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _kernel_group(r: CompileResult) -> str:
    """The kernel and dtype class of a result, for the summary: ``gpa_fwd fp16``."""
    base = r.name.split("[")[0]
    inner = r.name.split("[", 1)[1] if "[" in r.name else ""
    dtype = next((t for t in ("fp32", "fp16", "bf16") if re.search(rf"\b{t}\b", inner)), "")
    return f"{base} {dtype}".strip()


def summary_table(results: list[CompileResult], markdown: bool = False) -> str:
    """One row per (kernel, dtype, arch): configuration count and the ranges of the facts."""
    groups: dict[tuple[str, int], list[CompileResult]] = {}
    for r in results:
        groups.setdefault((_kernel_group(r), r.arch), []).append(r)
    header = (
        "kernel",
        "arch",
        "configs",
        "regs",
        "spill B",
        "smem B",
        "blocks/SM",
        "MMA",
        "async copies",
        "result",
    )
    rows = [header]

    def rng(vals):
        vals = sorted(vals)
        return "–" if not vals else (str(vals[0]) if vals[0] == vals[-1] else f"{vals[0]}-{vals[-1]}")

    for (group, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ok = [r for r in rs if r.ok]
        bad = [r for r in rs if r.open_failures()]
        reasons = sorted({_reason_class(f) for r in bad for f in r.open_failures()})
        known = [r for r in rs if r.failures() and not r.open_failures()]
        known_reasons = sorted({_reason_class(f) for r in known for f in r.failures()})
        if bad:
            verdict = f"FAIL {len(bad)}: " + "; ".join(reasons)
        elif known:
            verdict = f"known {len(known)}: " + "; ".join(known_reasons)
        else:
            verdict = "ok"
        rows.append(
            (
                group,
                f"sm_{arch}",
                str(len(rs)),
                rng([r.registers for r in ok]),
                rng([r.spill_bytes for r in ok]),
                rng([r.shared_bytes for r in ok]),
                rng([r.blocks_per_sm for r in ok]),
                "/".join(sorted({_mma_text(r) for r in ok})) or "–",
                "/".join(sorted({"none" if not r.n_async else "+".join(r.async_copies) for r in ok})) or "–",
                verdict,
            )
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _reason_class(failure: str) -> str:
    for key, text in (
        ("spills", "spills"),
        ("needs HGMMA", "HMMA not HGMMA"),
        ("no MMA", "no MMA"),
        ("asynchronous copy", "stages without async copies"),
        ("launched with", "launch options differ from spec"),
        ("no launch case", "no launch case"),
        ("compile error", "compile error"),
        ("does not fit", "does not fit"),
    ):
        if key in failure:
            return text
    return failure[:40]


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-m", "prompt_kernels.tools.compile_check", *argv], env=env
    ).returncode


def results_to_json(results: list[CompileResult]) -> list[dict]:
    out = []
    for r in results:
        d = asdict(r)
        d.update(
            spill_bytes=r.spill_bytes,
            tensor_cores=r.tensor_cores,
            expected_mma=r.expected_mma,
            failures=r.failures(),
            open_failures=r.open_failures(),
            verdict=r.verdict,
        )
        out.append(d)
    return out


def _print_progress(done: int, total: int, res: CompileResult) -> None:
    state = "ok" if res.ok else "ERROR"
    print(
        f"[{done}/{total}] {res.name} sm_{res.arch} {state} {res.seconds:.1f} s", file=sys.stderr, flush=True
    )


def report(
    specs,
    archs=ARCHS,
    jobs: int = 1,
    json_path: str | None = None,
    progress: bool = False,
    launches=None,
    markdown: bool = False,
    sass: bool = False,
    full_table: bool = True,
    only: str | None = None,
    known=(),
) -> int:
    """Compile, print the table, the summary and the failures, optionally write JSON; return the
    exit status: 1 on any failure that no entry of ``known`` (KnownFailure) covers."""
    t0 = time.perf_counter()
    broken: list[str] = []
    results = check(
        specs,
        tuple(archs),
        jobs=jobs,
        progress=_print_progress if progress else None,
        launches=launches,
        sass=sass,
        problems_out=broken,
        only=only,
    )
    warnings = apply_known_failures(results, known)
    print(f"toolchain: {toolchain_summary(archs)}")
    if full_table:
        print(format_table(results, markdown=markdown))
        print()
    print(summary_table(results, markdown=markdown))
    by_reason: dict[str, list[str]] = {}
    for r in results:
        for k in r.known:
            failure, reason = k.split(" -- ", 1)
            by_reason.setdefault(f"{_reason_class(failure)}: {reason}", []).append(f"{r.name} sm_{r.arch}")
    for reason, names in by_reason.items():
        print(f"known ({len(names)}) {reason}")
        print(f"    {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    failed = [(r, f) for r in results for f in r.open_failures()]
    for r, why in failed:
        print(f"FAIL {r.name} sm_{r.arch}: {why}")
        if not r.ok and why.startswith("compile error"):
            print("    " + r.error.replace("\n", "\n    ")[:4000])
    for why in broken:
        print(f"FAIL {why}")
    for why in warnings:
        print(f"WARN {why}")
    if json_path:
        Path(json_path).write_text(json.dumps(results_to_json(results), indent=1))
    n_bad = len({(r.name, r.arch) for r, _ in failed})
    n_known = sum(1 for r in results if r.verdict == "known")
    n_specs = len(list(specs))
    print(
        f"compile_check: {len(results)} compiles ({n_specs} specs and the launch cases, {len(archs)} archs) "
        f"in {time.perf_counter() - t0:.1f} s, {n_bad} failing, {n_known} known failures "
        "(registry.KNOWN_FAILURES)"
    )
    return 1 if failed or broken else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _rerun_without_interpreter(argv)
    parser = argparse.ArgumentParser(
        prog="python -m prompt_kernels.tools.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)"
    )
    parser.add_argument("--filter", default=None, help="only specs whose name or op contains this text")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many forked processes"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-compile progress lines on stderr")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--summary", action="store_true", help="print the per-kernel summary only")
    parser.add_argument("--sass", action="store_true", help="also read the SASS (cuobjdump; slower)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail on the known failures too (ignore registry.KNOWN_FAILURES)",
    )
    args = parser.parse_args(argv)

    specs = registered_specs()
    if not specs:
        print("compile_check: no CompileSpec registered (prompt_kernels/kernels/*.py register none): failing")
        return 1
    launches = registered_launches()
    if args.filter:
        specs = [(op, s) for op, s in specs if args.filter in s.name or args.filter in op]
        ops = {op for op, _ in specs}
        launches = [(op, n, fn) for op, n, fn in launches if op in ops]
        if not specs:
            print(f"compile_check: no CompileSpec matches --filter {args.filter!r}")
            return 1
    return report(
        specs,
        tuple(args.arch),
        jobs=args.jobs,
        json_path=args.json,
        progress=not args.quiet,
        launches=launches,
        markdown=args.markdown,
        sass=args.sass,
        full_table=not args.summary,
        only=args.filter,
        known=() if args.strict else _registered_known_failures(),
    )


if __name__ == "__main__":
    sys.exit(main())
