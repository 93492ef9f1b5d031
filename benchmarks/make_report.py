"""Write benchmarks/README.md from the latest benchmark CSV, the roofline report, the compile-check
summary, their "before" copies and the per-op notes.

python -m benchmarks.run            # appends timings to benchmarks/results/results.csv, draws plots
python -m prompt_kernels.tools.roofline --markdown > benchmarks/results/roofline.md
python -m prompt_kernels.tools.roofline --no-compile --json rows.json
python -m benchmarks.make_report --launches rows.json > benchmarks/results/roofline_launches.md
python -m prompt_kernels.tools.compile_check --summary --markdown --jobs 2 --quiet \
    > benchmarks/results/compile_summary.md
python -m benchmarks.make_report    # this file

A file ``results/<name>_2026-12-04_before.md`` next to ``roofline.md``, ``roofline_launches.md`` or
``compile_summary.md`` (the same tool's output on the tree before this session's kernel changes) is
shown collapsed after the current table, and the "what changed" tables compare the two.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
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


BEFORE_COMMIT = "f862eb0"
BEFORE_TAG = "2026-12-04_before"
BEFORE_TITLE = f"Before this session's kernel changes (commit {BEFORE_COMMIT})"
# compile-check kernel groups (gpa_fwd fp16, nearest_kernel fp32, ...) -> op
GROUP_OPS = {"gpa_": "gated_prefix_attention", "phm_linear": "phm_linear", "prompt_pool": "prompt_pool"}


def before_path(path: Path) -> Path:
    """``results/roofline.md`` -> ``results/roofline_2026-12-04_before.md``."""
    return path.with_name(f"{path.stem}_{BEFORE_TAG}{path.suffix}")


def _read(path: Path) -> str:
    return path.read_text().strip() + "\n" if path.exists() else ""


def md_tables(text: str) -> list[list[dict]]:
    """The markdown tables of ``text``, each a list of {header: cell} rows."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
            continue
        if len(block) >= 2:
            tables.append([dict(zip(block[0], cells)) for cells in block[2:]])
        block = []
    return tables


def _first_table(text: str, column: str) -> list[dict]:
    return next((t for t in md_tables(text) if t and column in t[0]), [])


def roofline_cases(text: str) -> dict[str, dict]:
    """The rows of a roofline report by case."""
    return {r["case"]: r for r in _first_table(text, "issued/floor B")}


def launch_counts(text: str) -> dict[str, int]:
    """case -> launches per call, from a ``--launches`` table."""
    return {r["case"]: int(r["launches"]) for r in _first_table(text, "launches")}


def launches_table(rows_json: Path) -> str:
    """Launches per case from ``roofline --json`` rows (the markdown report leaves them out)."""
    out = [
        "_Launches per call of each roofline case (`python -m prompt_kernels.tools.roofline --json`), written "
        "by `python -m benchmarks.make_report --launches ROWS.json`._",
        "",
        "| case | launches | programs | kernels |",
        "|---|---|---|---|",
    ]
    for r in json.loads(Path(rows_json).read_text()):
        out.append(f"| {r['case']} | {r['launches']} | {r['programs']} | {', '.join(r['kernels']) or '–'} |")
    return "\n".join(out) + "\n"


def _op_of_group(group: str) -> str:
    name = group.split()[0]
    op = next((op for prefix, op in GROUP_OPS.items() if name.startswith(prefix)), None)
    if op is None:  # vq kernels (vq_nearest, nearest_kernel, ...), or name_fwd/name_bwd
        op = (
            "vq"
            if name.startswith("vq_") or "nearest" in name
            else re.sub(r"_(fwd|bwd|kernel)\b.*", "", name)
        )
    return op


def _op_of_case(case: str) -> str:
    name = case.split()[0]
    return "vq" if name.startswith("vq_") else name


def _max_int(text: str) -> int:
    return max((int(x) for x in re.findall(r"\d+", text)), default=0)


def compile_by_op(text: str) -> dict[str, dict]:
    """Per op, from a ``compile_check --summary --markdown`` table: compiles, the MMA kinds of its
    tensor-core groups on sm_90 and the groups on HMMA there, the tensor-core (group, arch) rows with
    asynchronous copies, the largest spill of each spilling row, known and open failures."""
    out: dict[str, dict] = {}
    for r in _first_table(text, "configs"):
        d = out.setdefault(
            _op_of_group(r["kernel"]),
            {
                "compiles": 0,
                "mma90": set(),
                "hmma90": [],
                "tc": 0,
                "tc_async": 0,
                "spills": [],
                "known": 0,
                "open": 0,
            },
        )
        d["compiles"] += int(r["configs"])
        mma = set(r["MMA"].split("/")) & {"HMMA", "HGMMA"}
        if mma:
            d["tc"] += 1
            d["tc_async"] += r["async copies"] not in ("none", "–")
            if r["arch"] == "sm_90":
                d["mma90"] |= mma
                if "HMMA" in mma:
                    d["hmma90"].append(r["kernel"])
        if _max_int(r["spill B"]):
            d["spills"].append(_max_int(r["spill B"]))
        m = re.match(r"(known|FAIL) (\d+)", r["result"])
        if m:
            d["known" if m.group(1) == "known" else "open"] += int(m.group(2))
    return out


def _arrow(old, new) -> str:
    return str(new) if old == new else f"{old} → {new}"


def _launches_per_kernel(counts: dict[str, int]) -> dict[tuple[str, str], str]:
    """(op, "name direction") -> the launch counts of its cases ("3" or "2-3"); the ``(before: ...)``
    cases (the old path kept as a traffic case) are not what the op launches now."""
    vals: dict[tuple[str, str], set] = defaultdict(set)
    for case, n in counts.items():
        if "(before:" not in case:
            name, direction = case.split()[:2]
            vals[(_op_of_case(case), direction if name == _op_of_case(case) else f"{name} {direction}")].add(
                n
            )
    return {k: str(min(v)) if min(v) == max(v) else f"{min(v)}-{max(v)}" for k, v in vals.items()}


def _spill_text(d: dict) -> str:
    return f"{len(d['spills'])} rows, max {max(d['spills'])} B" if d.get("spills") else "none"


def changes_tables(results: Path = RESULTS) -> str:
    """Before → now, per op (compile summaries, launches) and per case (roofline reports, launches);
    empty when no "before" file exists."""
    roof, cc, launch = (results / f for f in ("roofline.md", "compile_summary.md", "roofline_launches.md"))
    if not any(before_path(p).exists() for p in (roof, cc, launch)):
        return ""
    out = [
        f"### What changed: {BEFORE_TITLE[0].lower() + BEFORE_TITLE[1:]} → now",
        "",
        "Computed from `results/compile_summary*.md`, `results/roofline*.md` and `results/roofline_launches*.md`;",
        "one value: unchanged. Compile facts over the sm_80 and sm_90 rows (kernel, dtype, arch) of the summary:",
        "sm_90 MMA: the kinds of the op's tensor-core rows on sm_90, and those still on HMMA (mma.sync, not",
        "wgmma); async copies: tensor-core rows whose configurations use `cp.async` / tensor-core rows;",
        "spills: rows with a spilling configuration (largest spill); known: configurations failing a",
        "criterion listed in `KNOWN_FAILURES`, open: failing ones not listed.",
        "",
        "| op | launches per call | compiles | sm_90 MMA | HMMA on sm_90 in | async copies | spills | known / open failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    old_cc, new_cc = compile_by_op(_read(before_path(cc))), compile_by_op(_read(cc))
    old_lc, new_lc = launch_counts(_read(before_path(launch))), launch_counts(_read(launch))
    old_l, new_l = _launches_per_kernel(old_lc), _launches_per_kernel(new_lc)
    for op in sorted(set(old_cc) | set(new_cc) | {k[0] for k in [*old_l, *new_l]}):
        o, n = old_cc.get(op, {}), new_cc.get(op, {})
        keys = sorted(
            {k[1] for k in [*old_l, *new_l] if k[0] == op}, key=lambda k: (k.split()[:-1], k[-3:] != "fwd")
        )
        launches = "; ".join(f"{k} {_arrow(old_l.get((op, k), '–'), new_l.get((op, k), '–'))}" for k in keys)
        cells = [
            launches or "–",
            _arrow(o.get("compiles", "–"), n.get("compiles", "–")),
            _arrow("/".join(sorted(o.get("mma90", ()))) or "–", "/".join(sorted(n.get("mma90", ()))) or "–"),
            _arrow(", ".join(o.get("hmma90", ())) or "none", ", ".join(n.get("hmma90", ())) or "none"),
            _arrow(f"{o.get('tc_async', 0)}/{o.get('tc', 0)}", f"{n.get('tc_async', 0)}/{n.get('tc', 0)}"),
            _arrow(_spill_text(o), _spill_text(n)),
            _arrow(f"{o.get('known', 0)} / {o.get('open', 0)}", f"{n.get('known', 0)} / {n.get('open', 0)}"),
        ]
        out.append(f"| {op} | " + " | ".join(cells) + " |")
    old_r, new_r = roofline_cases(_read(before_path(roof))), roofline_cases(_read(roof))
    keys = ("programs", "issued/floor B", "unique/floor B", "dot/floor flop", "predicted H100 kernel µs")
    out += [
        "",
        "Per roofline case (a case named `... (split ...)` continues the case of its name without the",
        "parenthesis; `(before: ...)` cases run the old path in today's code and are new cases):",
        "",
        "| case | launches | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for case, n in new_r.items():
        base = case if case in old_r or "(before:" in case else case.split(" (", 1)[0]
        o = old_r.get(base, {})
        cells = [_arrow(old_lc.get(base, "–"), new_lc.get(case, "–"))]
        cells += [_arrow(o.get(k, "–"), n.get(k, "–")) for k in keys]
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    for case in old_r:
        if not any(c == case or c.split(" (", 1)[0] == case for c in new_r):
            out.append(
                f"| {case} (no longer a case) | {old_lc.get(case, '–')} | "
                + " | ".join(old_r[case].get(k, "–") for k in keys)
                + " |"
            )
    return "\n".join(out) + "\n"


def before_block(path: Path, what: str) -> list[str]:
    """The "before" copy of a results file, collapsed; nothing when it does not exist."""
    text = _read(before_path(path))
    if not text:
        return []
    return [
        "<details>",
        f"<summary>{BEFORE_TITLE}: {what} (<code>results/{before_path(path).name}</code>)</summary>",
        "",
        text,
        "</details>",
        "",
    ]


def compile_summary_md(text: str) -> str:
    """A ``compile_check --summary --markdown`` output: the table as markdown, the other lines
    (toolchain, known failures by reason, totals) as text blocks around it."""
    out, prose, fence = [], [], False
    for line in text.splitlines():
        if line.startswith("|"):
            if prose:
                out += ["```text", *prose, "```", ""]
                prose = []
            out.append(line)
            fence = True
        elif line.startswith("_") and not fence and not prose:
            out += [line, ""]  # a header line of a saved copy
        elif line.strip():
            if fence:
                out.append("")
                fence = False
            prose.append(line)
    if prose:
        out += ["```text", *prose, "```"]
    return "\n".join(out) + "\n"


COMPILE_INTRO = """\
`make compile-check` (`python -m prompt_kernels.tools.compile_check --jobs 2 --quiet`, part of `make
test`; `--summary --markdown` prints the table below, `--json PATH` every record, `--strict` also fails
on the known failures) compiles what the launchers launch, for sm_80 and sm_90, without a GPU: every
registered launch case runs against a compile-only CUDA target of each architecture (Triton's own
argument specialisation and launch options), and every CompileSpec is launched the same way with the
arguments of a launch case of its kernel. Registers and spills come from `ptxas -v`, the MMA kind
(HMMA = `mma.sync`, HGMMA = `wgmma`) and the asynchronous copies (`cp.async`, TMA) from the PTX. It
fails on spills, on a tensor-core `tl.dot` without MMA (on sm_90 without HGMMA), on `num_stages >= 2`
loops with loads and `tl.dot` but no asynchronous copy, and on specs whose launch options differ from
the launcher's; failures listed in `prompt_kernels/kernels/registry.py` (`KNOWN_FAILURES`, with the
reason) are reported as `known` and do not fail the target. These are compile facts, not timings.
The GPU report's per-case compile facts come from the same check. Triton 3.7.1 is the pinned
version: the tables and `KNOWN_FAILURES` are for it (3.9.0, tried on the VQ kernels, compiles but
gives other machine code; that run and the cold-cache timings are in this file at commit f862eb0).

Per kernel, dtype and architecture (configs: compiles; ranges over them; blocks/SM: from registers
and shared memory; `*_kernel` rows are launch-case configurations that no spec lists):
"""


def build_report(results: Path = RESULTS, csv_path: Path = CSV_PATH, notes: Path = HERE / "notes") -> str:
    parts = [
        "# Benchmarks and the GPU report",
        "",
        "Everything here was produced by the commands below on the machine named in each table. No GPU was",
        "available: CPU timings are measured; GPU figures are **predictions** from the traffic meter and the",
        "H100 roofline (3.35 TB/s, 990 TFLOP/s), never measurements, and the compile check reports what",
        "Triton and `ptxas` produce for sm_80/sm_90 (registers, spills, MMA kind), not how fast it runs.",
        "",
        "```bash",
        "make bench                         # or: .venv/bin/python -m benchmarks.run [--quick]",
        ".venv/bin/python -m prompt_kernels.tools.roofline --markdown > benchmarks/results/roofline.md",
        ".venv/bin/python -m prompt_kernels.tools.roofline --no-compile --json /tmp/rows.json",
        ".venv/bin/python -m benchmarks.make_report --launches /tmp/rows.json > benchmarks/results/roofline_launches.md",
        ".venv/bin/python -m prompt_kernels.tools.compile_check --summary --markdown --jobs 2 --quiet \\",
        "    > benchmarks/results/compile_summary.md",
        ".venv/bin/python -m benchmarks.make_report",
        "```",
        "",
        "Ratios: providers of one (kernel, mode, size) are timed interleaved in one process; p50/p20/p80 over",
        "the repeats; `vs prompt_kernels` = provider p50 / our p50 (above 1: we are faster).",
        "",
        "## Measured (CPU)",
        "",
        results_tables(csv_path),
        "## GPU report (roofline from the traffic meter; predictions)",
        "",
    ]
    roof, cc, launch = (results / f for f in ("roofline.md", "compile_summary.md", "roofline_launches.md"))
    parts.append(_read(roof) or "_Run the roofline command above._\n")
    parts += before_block(roof, "GPU report")
    if launch.exists():
        parts += [
            "<details>",
            "<summary>Launches per call (<code>results/roofline_launches.md</code>)</summary>",
            "",
        ]
        parts += [_read(launch), "</details>", ""]
    parts += before_block(launch, "launches per call")
    changes = changes_tables(results)
    if changes:
        parts += [changes]
    parts += ["## Compile check (sm_80 / sm_90): what launches", "", COMPILE_INTRO]
    parts.append(compile_summary_md(_read(cc)) if cc.exists() else "_Run the compile-check command above._\n")
    if before_path(cc).exists():
        parts += [
            "<details>",
            f"<summary>{BEFORE_TITLE}: compile check (<code>results/{before_path(cc).name}</code>)</summary>",
            "",
            compile_summary_md(_read(before_path(cc))),
            "</details>",
            "",
        ]
    parts += ["## Per-op notes (floors, design, measured tables, compile check)", ""]
    for name in NOTES:
        if (notes / f"{name}.md").exists():
            parts.append(f"- [{name}](notes/{name}.md)")
    for extra in ("experiment_methods.md", "experiment_spt.md"):
        p = results / extra
        if p.exists():
            parts += ["", f"## {extra.removesuffix('.md').replace('_', ' ')}", "", p.read_text()]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.make_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--launches", metavar="ROWS_JSON", help="print the launches table of roofline --json rows"
    )
    parser.add_argument("--out", default=str(HERE / "README.md"), help="where to write the report")
    args = parser.parse_args(argv)
    if args.launches:
        print(launches_table(Path(args.launches)), end="")
        return 0
    Path(args.out).write_text(build_report())
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
