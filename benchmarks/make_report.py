"""Write benchmarks/README.md from the latest benchmark CSV, the roofline report and the per-op notes.

python -m benchmarks.run            # appends timings to benchmarks/results/results.csv, draws plots
python -m prompt_kernels.tools.roofline --markdown > benchmarks/results/roofline.md
python -m benchmarks.make_report    # this file
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from benchmarks.common import CSV_PATH, RESULTS

HERE = Path(__file__).resolve().parent
NOTES = ["phm_linear", "prompt_pool", "vq", "gated_prefix_attention", "patch", "tools"]


def _latest_rows(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["kernel"], r["provider"], r["mode"], r["metric"], r["size"])] = r
    return list(latest.values())


def _fmt_ms(v: str) -> str:
    return f"{float(v):.3f} ms"


def _fmt_bytes(v: str) -> str:
    return f"{float(v) / 2**20:.1f} MiB"


def results_tables(path: Path = CSV_PATH) -> str:
    if not path.exists():
        return "_No results yet: run `python -m benchmarks.run`._\n"
    groups = defaultdict(list)
    for r in _latest_rows(path):
        groups[(r["kernel"], r["mode"], r["size"], r["metric"])].append(r)
    out, machines = [], set()
    by_kernel = defaultdict(list)
    for key, rs in groups.items():
        by_kernel[key[0]].append((key, rs))
    for kernel in sorted(by_kernel):
        out.append(f"### {kernel}\n")
        out.append("| mode | size | metric | provider | p50 | p20 | p80 | vs prompt_kernels |")
        out.append("|---|---|---|---|---|---|---|---|")
        for (_, mode, size, metric), rs in sorted(by_kernel[kernel], key=lambda kv: kv[0]):
            ours = next((float(r["p50"]) for r in rs if r["provider"] == "prompt_kernels"), None)
            for r in sorted(rs, key=lambda r: r["provider"] != "prompt_kernels"):
                machines.add(r["machine"])
                ratio = f"{float(r['p50']) / ours:.2f}x" if ours else "–"
                fmt = _fmt_ms if r["unit"] == "ms" else _fmt_bytes
                out.append(
                    f"| {mode} | {size} | {metric} | {r['provider']} | {fmt(r['p50'])} | {fmt(r['p20'])} | "
                    f"{fmt(r['p80'])} | {ratio} |"
                )
        png = RESULTS / f"{kernel}.png"
        if png.exists():
            out.append(f"\n![{kernel}](results/{png.name})\n")
        out.append("")
    head = "Machine(s): " + "; ".join(sorted(machines)) + "\n" if machines else ""
    return head + "\n" + "\n".join(out)


def main() -> int:
    parts = [
        "# Benchmarks and the GPU report",
        "",
        "Everything here was produced by the commands below on the machine named in each table. No GPU was",
        "available: CPU timings are measured; GPU figures are **predictions** from the traffic meter and the",
        "H100 roofline (3.35 TB/s, 990 TFLOP/s), never measurements.",
        "",
        "```bash",
        "make bench                         # or: .venv/bin/python -m benchmarks.run [--quick]",
        ".venv/bin/python -m prompt_kernels.tools.roofline --markdown > benchmarks/results/roofline.md",
        ".venv/bin/python -m prompt_kernels.tools.compile_check",
        ".venv/bin/python -m benchmarks.make_report",
        "```",
        "",
        "Ratios: providers of one (kernel, mode, size) are timed interleaved in one process; p50/p20/p80 over",
        "the repeats; `vs prompt_kernels` = provider p50 / our p50 (above 1: we are faster).",
        "",
        "## Measured (CPU)",
        "",
        results_tables(),
        "## GPU report (roofline from the traffic meter; predictions)",
        "",
    ]
    roof = RESULTS / "roofline.md"
    parts.append(roof.read_text() if roof.exists() else "_Run the roofline command above._\n")
    parts += ["", "## Per-op notes (floors, design, measured tables, compile check)", ""]
    for name in NOTES:
        p = HERE / "notes" / f"{name}.md"
        if p.exists():
            parts.append(f"- [{name}](notes/{name}.md)")
    for extra in ("experiment_methods.md", "experiment_spt.md"):
        p = RESULTS / extra
        if p.exists():
            parts += ["", f"## {extra.removesuffix('.md').replace('_', ' ')}", "", p.read_text()]
    (HERE / "README.md").write_text("\n".join(parts) + "\n")
    print(HERE / "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
