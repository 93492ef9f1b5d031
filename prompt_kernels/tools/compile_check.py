"""Compile every registered Triton kernel configuration for sm_80 and sm_90, without a GPU.

Run as ``python -m prompt_kernels.tools.compile_check [--arch 80 90] [--filter NAME] [--json PATH]``.

For each :class:`~prompt_kernels.kernels.registry.CompileSpec` and architecture it compiles with
``triton.compile``, re-runs the bundled ``ptxas -v`` on the PTX (same flags as Triton) to read
registers and spills, takes the shared memory from the compiled metadata, reads the SASS with the
bundled ``cuobjdump -sass`` to see whether tensor-core instructions (HMMA / HGMMA) are used, and
computes the theoretical occupancy. Exits non-zero on any compile error, any spill, a configuration
whose shared memory does not fit one block, or a ``uses_dot`` fp16/bf16 spec without tensor cores.

The kernels must be real ``JITFunction`` objects: when ``TRITON_INTERPRET=1`` is set, ``main`` re-runs
itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def sm_arch(arch: int) -> str:
    """The ``--gpu-name`` Triton gives ptxas: sm_80, sm_90a."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


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


def run_ptxas(ptx: str, arch: int, enable_fp_fusion: bool = True) -> tuple[PtxasInfo, str]:
    """Assemble ``ptx`` with the bundled ptxas as Triton does (plus ``-v``); return the info and the log."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [_nvidia_bin("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2"]
        if not enable_fp_fusion:
            cmd.append("--fmad=false")
        cmd += [f"--gpu-name={sm_arch(arch)}", str(src), "-o", str(Path(tmp) / "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")
    return parse_ptxas_log(log), log


def sass_of(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuobjdump failed:\n{proc.stderr}")
        return proc.stdout


def tensor_core_instructions(sass: str) -> list[str]:
    """Distinct tensor-core opcodes in the SASS, e.g. ``["HMMA.16816.F32"]`` or ``["HGMMA.64x64x16.F32"]``."""
    return sorted({m.group(0) for m in _TC_RE.finditer(sass)})


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


def low_precision(spec) -> bool:
    """Whether the spec works on fp16/bf16 data (pointer types in the signature or dtype constexprs)."""
    texts = [str(t) for t in spec.signature.values()] + [str(v) for v in spec.constexprs.values()]
    return any(("fp16" in t or "bf16" in t or "float16" in t or "bfloat16" in t) for t in texts)


@dataclass
class CompileResult:
    name: str
    op: str
    arch: int
    num_warps: int
    num_stages: int
    uses_dot: bool
    low_precision: bool
    ok: bool = False
    error: str = ""
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0
    tensor_core_ops: list[str] = field(default_factory=list)
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy: float = 0.0
    occupancy_limiter: str = ""
    seconds: float = 0.0

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def tensor_cores(self) -> str:
        if self.tensor_core_ops:
            return "yes"
        return "no" if self.uses_dot else "–"

    def failures(self) -> list[str]:
        """Why this result fails the check (empty when it passes)."""
        if not self.ok:
            return [f"compile error: {self.error.strip().splitlines()[-1] if self.error.strip() else '?'}"]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_store_bytes} B stored / {self.spill_load_bytes} B loaded")
        if self.occupancy_limiter == "does not fit":
            out.append(f"does not fit one SM ({self.registers} regs, {self.shared_bytes} B shared)")
        if self.uses_dot and self.low_precision and not self.tensor_core_ops:
            out.append("uses_dot with fp16/bf16 but no tensor-core instruction in the SASS")
        return out


def _cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Path(base).parent / "prompt_kernels_compile_check"


def _machine_code_facts(ptx: str, cubin: bytes, arch: int, enable_fp_fusion: bool) -> dict:
    """Registers and spills (ptxas -v) and tensor-core opcodes (SASS), cached by the PTX's hash
    because ptxas on a large kernel takes seconds and Triton's own cache keeps no ptxas log."""
    key = hashlib.sha256(f"{arch}|{enable_fp_fusion}|".encode() + ptx.encode() + cubin).hexdigest()
    path = _cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    info, _ = run_ptxas(ptx, arch, enable_fp_fusion)
    facts = {
        "registers": info.registers,
        "spill_store_bytes": info.spill_store_bytes,
        "spill_load_bytes": info.spill_load_bytes,
        "tensor_core_ops": tensor_core_instructions(sass_of(cubin)),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(path)
    except OSError:
        pass
    return facts


def compile_one(spec, arch: int, op: str = "") -> CompileResult:
    """Compile ``spec`` for ``arch`` and collect registers, spills, shared memory, tensor cores, occupancy."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    res = CompileResult(
        name=spec.name,
        op=op,
        arch=arch,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        uses_dot=spec.uses_dot,
        low_precision=low_precision(spec),
    )
    t0 = time.perf_counter()
    try:
        if not isinstance(spec.kernel, JITFunction):
            raise TypeError(
                f"{spec.name}: kernel is {type(spec.kernel).__name__}, not a JITFunction "
                "(was TRITON_INTERPRET=1 set when the kernels were imported?)"
            )
        src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        facts = _machine_code_facts(
            compiled.asm["ptx"], compiled.asm["cubin"], arch, compiled.metadata.enable_fp_fusion
        )
        res.registers = facts["registers"]
        res.spill_store_bytes = facts["spill_store_bytes"]
        res.spill_load_bytes = facts["spill_load_bytes"]
        res.shared_bytes = int(compiled.metadata.shared)
        res.tensor_core_ops = facts["tensor_core_ops"]
        occ = occupancy(arch, spec.num_warps, res.registers, res.shared_bytes)
        res.blocks_per_sm, res.warps_per_sm = occ.blocks_per_sm, occ.warps_per_sm
        res.occupancy, res.occupancy_limiter = occ.fraction, occ.limiter
        res.ok = True
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    return res


def registered_specs() -> list[tuple[str, object]]:
    """``(op, spec)`` for every registered CompileSpec, in the registry's order."""
    from prompt_kernels.kernels import registry

    registry.import_all_kernel_modules()
    return [(op, spec) for op in sorted(registry._COMPILE) for fn in registry._COMPILE[op] for spec in fn()]


def check(specs: list[tuple[str, object]], archs=ARCHS, jobs: int = 1, progress=None) -> list[CompileResult]:
    """Compile every ``(op, spec)`` for every arch. ``jobs > 1`` uses a forked process pool.
    ``progress(done, total, result)`` is called after each compile when given."""
    tasks = [(i, arch) for i in range(len(specs)) for arch in archs]
    if jobs <= 1 or len(tasks) < 2:
        results = []
        for i, arch in tasks:
            results.append(compile_one(specs[i][1], arch, specs[i][0]))
            if progress:
                progress(len(results), len(tasks), results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    global _POOL_SPECS
    _POOL_SPECS = specs
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        results = []
        for res in pool.map(_compile_task, tasks):
            results.append(res)
            if progress:
                progress(len(results), len(tasks), res)
        return results


_POOL_SPECS: list = []


def _compile_task(task):
    i, arch = task
    op, spec = _POOL_SPECS[i]
    return compile_one(spec, arch, op)


def format_table(results: list[CompileResult]) -> str:
    header = ("name", "arch", "warps", "stages", "regs", "spill B", "shared B", "occupancy", "tensor cores")
    rows = [header]
    for r in results:
        if not r.ok:
            rows.append((r.name, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages), "ERR", "", "", "", ""))
            continue
        occ = f"{r.warps_per_sm}/64 ({r.occupancy:.0%}, {r.occupancy_limiter})"
        tc = r.tensor_cores + (f" ({r.tensor_core_ops[0].split('.')[0]})" if r.tensor_core_ops else "")
        rows.append(
            (
                r.name,
                f"sm_{r.arch}",
                str(r.num_warps),
                str(r.num_stages),
                str(r.registers),
                str(r.spill_bytes),
                str(r.shared_bytes),
                occ,
                tc,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        d.update(spill_bytes=r.spill_bytes, tensor_cores=r.tensor_cores, failures=r.failures())
        out.append(d)
    return out


def _print_progress(done: int, total: int, res: CompileResult) -> None:
    state = "ok" if res.ok else "ERROR"
    print(
        f"[{done}/{total}] {res.name} sm_{res.arch} {state} {res.seconds:.1f} s", file=sys.stderr, flush=True
    )


def report(
    specs: list[tuple[str, object]],
    archs=ARCHS,
    jobs: int = 1,
    json_path: str | None = None,
    progress: bool = False,
) -> int:
    """Compile, print the table and the failures, optionally write JSON; return the exit status."""
    t0 = time.perf_counter()
    results = check(specs, tuple(archs), jobs=jobs, progress=_print_progress if progress else None)
    print(format_table(results))
    failed = [(r, f) for r in results for f in r.failures()]
    for r, why in failed:
        print(f"FAIL {r.name} sm_{r.arch}: {why}")
        if not r.ok:
            print("    " + r.error.replace("\n", "\n    ")[:4000])
    if json_path:
        Path(json_path).write_text(json.dumps(results_to_json(results), indent=1))
    n_bad = len({(r.name, r.arch) for r, _ in failed})
    print(
        f"compile_check: {len(results)} compiles ({len(specs)} specs x {len(archs)} archs) in "
        f"{time.perf_counter() - t0:.1f} s, {n_bad} failing"
    )
    return 1 if failed else 0


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
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many forked processes")
    parser.add_argument("--quiet", action="store_true", help="no per-compile progress lines on stderr")
    args = parser.parse_args(argv)

    specs = registered_specs()
    if not specs:
        print("compile_check: no CompileSpec registered (prompt_kernels/kernels/*.py register none): failing")
        return 1
    if args.filter:
        specs = [(op, s) for op, s in specs if args.filter in s.name or args.filter in op]
        if not specs:
            print(f"compile_check: no CompileSpec matches --filter {args.filter!r}")
            return 1
    return report(specs, tuple(args.arch), jobs=args.jobs, json_path=args.json, progress=not args.quiet)


if __name__ == "__main__":
    sys.exit(main())
