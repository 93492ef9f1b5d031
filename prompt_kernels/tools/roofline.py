"""Roofline report: counted traffic and flops of every registered LaunchCase against its floors.

Run as ``python -m prompt_kernels.tools.roofline [--filter NAME] [--markdown] [--no-compile]``.

For every :class:`~prompt_kernels.kernels.registry.LaunchCase` it runs the launch under the Triton
interpreter with the :class:`~prompt_kernels.tools.traffic.TrafficMeter` and reports

* issued bytes / floor bytes (no cache: every load and store goes to DRAM),
* unique bytes / floor bytes (perfect cache: every distinct byte moves once per launch),
* tl.dot flops / floor flops,
* a *predicted* H100 SXM time ``max(bytes / 3.35e12 B/s, flops / 990e12 flop/s)`` for the floors and
  for the kernel (issued bytes, max(dot flops, floor flops)): a model, not a measurement,
* the compile-check facts of the kernels the case launches (``compile_check`` run in a subprocess
  without the interpreter, cached by Triton; records matched by the op they are registered under,
  ``vq`` for the ``vq_nearest`` case, and by kernel name), and the case's scale note,
* two goals: memory-bound cases (``prompt_pool``, or ``phm_linear`` whose floor intensity is below the
  H100 ridge point) issue at most 1.5x their floor bytes; ops whose CompileSpecs say ``uses_dot``
  do their products with ``tl.dot`` (dot flops > 0).

With CUDA available (and ``TRITON_INTERPRET`` unset) the traffic is still counted in an interpreted
CPU subprocess, and each case's launch callable is also timed on the GPU with
``triton.testing.do_bench`` under ``torch.device("cuda")`` ("measured", beside "predicted").
Exit status: 1 when a launch case fails to run (goals not met are reported, not fatal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
H100_FLOPS_PER_S = 990e12  # H100 SXM dense bf16/fp16 tensor-core peak
RIDGE_FLOPS_PER_BYTE = H100_FLOPS_PER_S / H100_BYTES_PER_S
MEMORY_GOAL_RATIO = 1.5


def predicted_seconds(nbytes: float, flops: float) -> float:
    """Roofline time on an H100 SXM: whichever of memory and tensor-core compute takes longer."""
    return max(nbytes / H100_BYTES_PER_S, flops / H100_FLOPS_PER_S)


@dataclass
class Row:
    case: str
    op: str
    direction: str
    floor_bytes: int
    floor_flops: int
    scale_note: str = ""
    launches: int = 0
    programs: int = 0
    issued_bytes: int = 0
    unique_bytes: int = 0
    dot_flops: int = 0
    predicted_floor_us: float = 0.0
    predicted_kernel_us: float = 0.0
    measured_us: float | None = None
    memory_goal: str = "–"  # "met", "not met" or "–" (does not apply)
    dot_goal: str = "–"
    compile_facts: str = ""
    error: str = ""
    kernels: list[str] = field(default_factory=list)

    @property
    def issued_ratio(self) -> float:
        return self.issued_bytes / self.floor_bytes if self.floor_bytes else float("nan")

    @property
    def unique_ratio(self) -> float:
        return self.unique_bytes / self.floor_bytes if self.floor_bytes else float("nan")

    @property
    def flop_ratio(self) -> float:
        return self.dot_flops / self.floor_flops if self.floor_flops else float("nan")


def memory_goal_applies(case) -> bool:
    """prompt_pool cases, and phm_linear cases whose floors put them below the H100 ridge point."""
    text = f"{case.op} {case.name}"
    if "prompt_pool" in text:
        return True
    if "phm_linear" in text:
        return case.floor_flops / max(case.floor_bytes, 1) < RIDGE_FLOPS_PER_BYTE
    return False


def ops_using_dot() -> set[str]:
    """Ops with at least one CompileSpec marked ``uses_dot`` (reads the registry; nothing is compiled)."""
    from prompt_kernels.kernels import registry

    registry.import_all_kernel_modules()
    return {op for op, fns in registry._COMPILE.items() for fn in fns if any(s.uses_dot for s in fn())}


def compile_facts(filter_text: str | None = None, timeout: float = 3600) -> list[dict]:
    """The compile check's JSON records, from a subprocess that imports the kernels without the
    interpreter (the kernels of an interpreted process cannot be compiled). Empty if none."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cc.json"
        cmd = [sys.executable, "-m", "prompt_kernels.tools.compile_check", "--json", str(path), "--quiet"]
        if filter_text:
            cmd += ["--filter", filter_text]
        subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return json.loads(path.read_text()) if path.exists() else []


def facts_for(records: list[dict], op: str, kernels: list[str] | None = None) -> list[dict]:
    """The compile-check records of a case: those of its op (the op it is registered under, which
    may be a prefix of the case's own op: ``vq`` for ``vq_nearest``), narrowed to the kernels the case
    launched when known (two ops may both have a ``_forward_kernel``)."""
    mine = [r for r in records if r.get("op") and (op == r["op"] or op.startswith(r["op"] + "_"))]
    if kernels:
        named = [r for r in mine if r.get("kernel") in kernels]
        mine = named or mine
    return mine


def summarize_compile_facts(records: list[dict]) -> str:
    """One line per arch over a case's configurations: registers, spills, shared, occupancy, MMA kind,
    asynchronous copies, failures."""
    if not records:
        return "no compile facts"
    parts = []
    for arch in sorted({r["arch"] for r in records}):
        rs = [r for r in records if r["arch"] == arch]
        bad = [r for r in rs if not r["ok"]]
        ok = [r for r in rs if r["ok"]]
        if not ok:
            parts.append(f"sm_{arch}: {len(bad)} compile errors")
            continue
        regs = sorted(r["registers"] for r in ok)
        shared = max(r["shared_bytes"] for r in ok)
        occ = sorted(r["occupancy"] for r in ok)
        spills = sum(r["spill_bytes"] for r in ok)
        mma = sorted({r.get("mma_kind") or ("none" if r.get("tensor_core_dot") else "-") for r in ok})
        if "mma_kind" not in ok[0]:  # records of an older compile check
            mma = sorted({r.get("tensor_cores", "?") for r in ok})
        n_async = sum(1 for r in ok if sum((r.get("async_copies") or {}).values()))
        failing = sum(1 for r in rs if r.get("verdict", "FAIL" if r.get("failures") else "ok") == "FAIL")
        known = sum(1 for r in rs if r.get("verdict") == "known")
        text = (
            f"sm_{arch}: {len(ok)} cfg, regs {regs[0]}-{regs[-1]}, spill {spills} B, shared <= {shared} B, "
            f"occ {occ[0]:.0%}-{occ[-1]:.0%}, MMA {'/'.join(mma)}, async copies in {n_async}/{len(ok)}"
        )
        if bad:
            text += f", {len(bad)} compile errors"
        if failing:
            text += f", {failing} failing"
        if known:
            text += f", {known} known failures"
        parts.append(text)
    return "; ".join(parts)


def _of_op(case_op: str, ops) -> bool:
    """Whether a case's op is one of ``ops`` or refines one (``vq_nearest`` of ``vq``)."""
    return any(case_op == o or case_op.startswith(o + "_") for o in ops)


def measure_case(case, uses_dot_ops: set[str], facts: list[dict]) -> Row:
    """Run one LaunchCase under the traffic meter (kernels must be interpreted) and fill its row;
    ``facts``: the compile-check JSON records (see :func:`facts_for`)."""
    from prompt_kernels.tools.traffic import TrafficMeter

    row = Row(case.name, case.op, case.direction, case.floor_bytes, case.floor_flops, case.scale_note)
    meter = TrafficMeter()
    try:
        with meter:
            case.launch()
    except Exception as e:
        row.error = f"{type(e).__name__}: {e}"
        return row
    t = meter.totals
    row.launches, row.programs = t.launches, t.programs
    row.issued_bytes, row.unique_bytes, row.dot_flops = t.issued_bytes, t.unique_bytes, t.dot_flops
    row.kernels = sorted({r.kernel for r in meter.launches})
    row.compile_facts = summarize_compile_facts(facts_for(facts, case.op, row.kernels))
    row.predicted_floor_us = 1e6 * predicted_seconds(case.floor_bytes, case.floor_flops)
    row.predicted_kernel_us = 1e6 * predicted_seconds(t.issued_bytes, max(t.dot_flops, case.floor_flops))
    if t.launches == 0:
        row.error = "the launch ran no Triton kernel (is TRITON_INTERPRET=1 set and the backend triton?)"
    if memory_goal_applies(case):
        row.memory_goal = "met" if row.issued_bytes <= MEMORY_GOAL_RATIO * case.floor_bytes else "not met"
    if _of_op(case.op, uses_dot_ops):
        row.dot_goal = "met" if t.dot_flops > 0 else "not met"
    return row


def build_rows(cases, uses_dot_ops: set[str] | None = None, facts: list[dict] | None = None) -> list[Row]:
    """Rows for ``cases``; ``facts`` are compile-check JSON records (matched by op and kernel)."""
    return [measure_case(c, uses_dot_ops or set(), list(facts or [])) for c in cases]


def time_on_gpu(cases, rows: list[Row]) -> None:
    """Fill ``measured_us`` with ``do_bench`` of each case's launch callable under ``torch.device("cuda")``
    (includes whatever the callable does besides the kernels, e.g. creating its inputs)."""
    import torch
    import triton.testing

    by_name = {r.case: r for r in rows}
    for case in cases:
        row = by_name.get(case.name)
        if row is None:
            continue
        try:
            with torch.device("cuda"):
                row.measured_us = 1e3 * triton.testing.do_bench(case.launch)
        except Exception as e:
            row.error = (
                row.error + "; " if row.error else ""
            ) + f"GPU timing failed: {type(e).__name__}: {e}"


def _fmt_ratio(x: float) -> str:
    return "–" if x != x else f"{x:.2f}x"


def format_rows(rows: list[Row], markdown: bool = False) -> str:
    header = [
        "case",
        "programs",
        "issued/floor B",
        "unique/floor B",
        "dot/floor flop",
        "floor B",
        "floor flop",
        "predicted H100 floor µs",
        "predicted H100 kernel µs",
        "measured µs",
        "mem goal <=1.5x",
        "tl.dot goal",
    ]
    body = []
    for r in rows:
        if r.error and not r.launches:
            body.append([r.case, "ERROR", r.error[:80]] + [""] * (len(header) - 3))
            continue
        body.append(
            [
                r.case,
                str(r.programs),
                _fmt_ratio(r.issued_ratio),
                _fmt_ratio(r.unique_ratio),
                _fmt_ratio(r.flop_ratio) if (r.dot_flops or r.dot_goal != "–") else "–",
                str(r.floor_bytes),
                str(r.floor_flops),
                f"{r.predicted_floor_us:.3f}",
                f"{r.predicted_kernel_us:.3f}",
                "–" if r.measured_us is None else f"{r.measured_us:.1f}",
                r.memory_goal,
                r.dot_goal,
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    else:
        widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Per case: kernels, compile facts of the op's configurations, scale note")
    for r in rows:
        extra = f" ERROR: {r.error}" if r.error else ""
        lines.append(f"- {r.case}: kernels {', '.join(r.kernels) or '–'}; {r.compile_facts}.{extra}")
        if r.scale_note:
            lines.append(f"  scale: {r.scale_note}")
    return "\n".join(lines)


def _env_for_interpreter() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m prompt_kernels.tools.roofline", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--filter", default=None, help="only cases whose name or op contains this text")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-check facts")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    import torch

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    gpu = torch.cuda.is_available() and not interpret
    if not gpu and not interpret:
        if "prompt_kernels.kernels" in sys.modules and any(
            m.startswith("prompt_kernels.kernels.") and m != "prompt_kernels.kernels.registry"
            for m in sys.modules
        ):
            # kernels already defined without the interpreter in this process: start a clean one
            cmd = [sys.executable, "-m", "prompt_kernels.tools.roofline", *argv]
            return subprocess.run(cmd, env=_env_for_interpreter()).returncode
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

    from prompt_kernels.kernels import registry

    cases = registry.launch_cases()
    if args.filter:
        cases = [c for c in cases if args.filter in c.name or args.filter in c.op]
    if not cases:
        print("roofline: no LaunchCase registered" + (f" matching {args.filter!r}" if args.filter else ""))
        return 1

    facts = [] if args.no_compile else compile_facts(args.filter)
    if gpu:
        # count traffic in an interpreted CPU process, then time the launches here on the GPU
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "prompt_kernels.tools.roofline", "--no-compile", "--json", str(path)]
            if args.filter:
                cmd += ["--filter", args.filter]
            subprocess.run(cmd, env=_env_for_interpreter(), capture_output=True, text=True)
            rows = [Row(**d) for d in json.loads(path.read_text())] if path.exists() else []
        for row in rows:
            row.compile_facts = summarize_compile_facts(facts_for(facts, row.op, row.kernels))
        time_on_gpu(cases, rows)
    else:
        rows = build_rows(cases, ops_using_dot(), facts)

    print(format_rows(rows, markdown=args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.error and not r.launches for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
