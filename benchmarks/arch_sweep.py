"""Prefix tuning and prompt tuning on every transformers architecture: ours (``prompt_kernels.attach``)
and PEFT's.

For every model type of the causal-LM, sequence-classification and seq2seq auto mappings of the
installed transformers, the tiny random model of ``prompt_kernels.testing.tiny_models`` (2 layers,
its bare forward + backward checked) is prompted with 4 prefix tokens, run forward with labels and
backward, and must give a finite loss and a non-zero gradient on every prompt parameter:

- ``ours``: ``ours_check`` (``prompt_kernels.attach(model, PrefixTuningConfig(prompt_length=4))``,
  then ``detach``);
- ``peft``: ``peft.PrefixTuningConfig(num_virtual_tokens=4)`` with task type CAUSAL_LM / SEQ_CLS /
  SEQ_2_SEQ_LM, SEQ_CLS through ``benchmarks.bench_patch.peft_task_type`` (FEATURE_EXTRACTION where
  PEFT 0.21.2's SEQ_CLS wrapper would refuse the model);
- ``ours_pt`` / ``peft_pt``: the same with prompt tuning (``PromptTuningConfig``, 4 vectors in front of
  the input embeddings), which needs no route into the layers.

Each check gets a fresh tiny model. Models run in a worker process, one after the other, each check
in its own try/except; a worker that dies (a crash no exception catches) or hangs is replaced, the
check it was in recorded as "crash" with the reason, and the sweep goes on. Writes a CSV (``mapping,
model_type, bare, ours, peft, ours_reason, peft_reason``; ok / fail / crash, "-" where not tried; the
reason is the exception's first line; ``ours_pt, peft_pt`` and their reasons after them, at most 200 characters) and a markdown summary next to it
(``.md``: versions, date, counts, lists, failure reasons grouped)::

    python -m benchmarks.arch_sweep [--mappings causal-lm seq-cls seq2seq] [--out benchmarks/results/arch_sweep.csv]
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import multiprocessing as mp
import os
import re
import time
import warnings
from pathlib import Path

import torch

from benchmarks.bench_patch import peft_task_type

PROMPT_LENGTH = 4
PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
CHECKS = ("ours", "peft", "ours_pt", "peft_pt")
COLUMNS = ("mapping", "model_type", "bare", "ours", "peft", "ours_reason", "peft_reason")
COLUMNS += ("ours_pt", "peft_pt", "ours_pt_reason", "peft_pt_reason")
WHO = {"ours": "Ours", "peft": "PEFT", "ours_pt": "Ours, prompt tuning", "peft_pt": "PEFT, prompt tuning"}
TIMEOUT_S = 300  # per model type (three tiny models and two prompted runs take well under a second)


def _reason(e: BaseException) -> str:
    """The exception's type and the first line of its message, at most 200 characters."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:200]


def _check_loss_and_grads(loss, params: list[torch.nn.Parameter], who: str) -> None:
    if loss is None:
        raise RuntimeError(f"{who}: the model returned no loss")
    if not torch.isfinite(loss).all():
        raise RuntimeError(f"{who}: the loss is not finite ({loss.item()})")
    loss.backward()
    if not params:
        raise RuntimeError(f"{who}: no prompt parameters")
    for p in params:
        if p.grad is None or not p.grad.abs().sum() > 0:
            raise RuntimeError(f"{who}: a prompt parameter {tuple(p.shape)} got no (or a zero) gradient")


def ours_check(model, inputs: dict, mapping: str) -> None:
    """Prefix tuning through ``prompt_kernels.attach`` (4 prompt tokens) on ``model``: forward with
    labels, backward, a finite loss and a non-zero gradient on every prompt parameter, then
    ``detach``. Raises on any failure."""
    import prompt_kernels

    pm = prompt_kernels.attach(model, prompt_kernels.PrefixTuningConfig(prompt_length=PROMPT_LENGTH))
    out = pm(**inputs)
    _check_loss_and_grads(getattr(out, "loss", None), list(pm.prompt_parameters()), f"ours ({mapping})")
    pm.detach()


def ours_pt_check(model, inputs: dict, mapping: str) -> None:
    """``ours_check`` with prompt tuning (4 vectors in front of the input embeddings)."""
    import prompt_kernels

    pm = prompt_kernels.attach(model, prompt_kernels.PromptTuningConfig(prompt_length=PROMPT_LENGTH))
    out = pm(**inputs)
    _check_loss_and_grads(getattr(out, "loss", None), list(pm.prompt_parameters()), f"ours PT ({mapping})")
    pm.detach()


def peft_check(model, inputs: dict, mapping: str, method: str = "PrefixTuningConfig") -> None:
    """PEFT's prefix tuning (``method``: or another of its prompt configs; 4 virtual tokens) on
    ``model``: forward with labels, backward, a finite loss and a non-zero gradient on every
    prompt-encoder parameter. Raises on any failure."""
    import peft

    task = peft_task_type(PEFT_TASKS[mapping], model)
    pm = peft.get_peft_model(model, getattr(peft, method)(task_type=task, num_virtual_tokens=PROMPT_LENGTH))
    out = pm(**inputs)
    params = [p for name, p in pm.named_parameters() if "prompt_encoder" in name and p.requires_grad]
    _check_loss_and_grads(getattr(out, "loss", None), params, f"peft {task}")


def sweep_one(mapping: str, model_type: str, progress=None) -> dict:
    """One CSV row: the bare tiny model, then the ``CHECKS``, each on a fresh one; ``progress(row)``
    gets the row as it is before each check."""
    from prompt_kernels.testing import tiny_models as tm

    row = dict.fromkeys(COLUMNS, "")
    row.update(mapping=mapping, model_type=model_type)
    try:
        model = tm.build_tiny(model_type, mapping)
    except Exception as e:
        reason = f"no tiny model: {str(e) or type(e).__name__}"[:200]
        row.update(bare="fail", **{c: "-" for c in CHECKS}, **{f"{c}_reason": reason for c in CHECKS})
        return row
    row["bare"] = "ok"
    del model
    checks = {
        "ours": ours_check,
        "peft": peft_check,
        "ours_pt": ours_pt_check,
        "peft_pt": lambda m, i, mp: peft_check(m, i, mp, "PromptTuningConfig"),
    }
    for name, check in checks.items():
        if progress is not None:
            progress(dict(row))
        try:
            model = tm.build_tiny(model_type, mapping)
            check(model, tm.tiny_inputs(model, mapping), mapping)
            row[name] = "ok"
        except Exception as e:
            row.update({name: "fail", f"{name}_reason": _reason(e)})
    return row


def _worker(conn) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(("done", sweep_one(*task, progress=lambda row: conn.send(("partial", row)))))


class _Worker:
    """A spawned process running ``sweep_one`` on the (mapping, model_type) tasks it is sent."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def run(self, task: tuple[str, str], timeout_s: float) -> tuple[dict, bool]:
        """``(row, True)``; ``(row, False)`` when the worker died or exceeded ``timeout_s``: the row
        as far as it got, the stage it was in marked "crash" with the reason."""
        mapping, model_type = task
        row = dict.fromkeys(COLUMNS, "")
        row.update(mapping=mapping, model_type=model_type)
        start = time.monotonic()
        try:
            self.conn.send(task)
            while time.monotonic() - start < timeout_s:
                if self.conn.poll(1.0):
                    kind, row = self.conn.recv()
                    if kind == "done":
                        return row, True
                elif not self.proc.is_alive():
                    break
        except (EOFError, OSError):  # the pipe broke: the worker is gone
            pass
        if time.monotonic() - start >= timeout_s:
            why = f"timed out after {timeout_s:.0f} s"
        else:
            self.proc.join(timeout=10)
            why = f"worker crashed (exit code {self.proc.exitcode})"
        if not row["bare"]:
            row.update(bare="crash", **{c: "-" for c in CHECKS}, **{f"{c}_reason": why for c in CHECKS})
        else:
            stage = next((c for c in CHECKS if not row[c]), CHECKS[-1])
            row.update({stage: "crash", f"{stage}_reason": why})
            row.update({c: row[c] or "-" for c in CHECKS})
        return row, False

    def close(self, kill: bool = False) -> None:
        try:
            if not kill:
                self.conn.send(None)
        except OSError:
            kill = True
        if kill:
            self.proc.kill()
        self.proc.join(timeout=30)


def sweep(tasks: list[tuple[str, str]], timeout_s: float = TIMEOUT_S, log=print) -> list[dict]:
    """Rows for ``tasks`` ((mapping, model_type) pairs), run in a worker process that is replaced
    when it dies or exceeds ``timeout_s`` on one model type (that model type's row says so)."""
    ctx = mp.get_context("spawn")
    rows, worker = [], None
    for mapping, model_type in tasks:
        worker = worker or _Worker(ctx)
        row, finished = worker.run((mapping, model_type), timeout_s)
        if not finished:
            worker.close(kill=True)
            worker = None
        rows.append(row)
        log(
            f"{mapping:<10} {model_type:<28} bare {row['bare']:<4} "
            + " ".join(f"{c} {row[c]:<4}" for c in CHECKS)
        )
    if worker is not None:
        worker.close()
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _group(reasons: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Reasons grouped, largest group first: numbers (shapes, sizes, ids) as #, the model type as
    <type>, model class names (``...For...``, ``...Model``) as <Model>, cut at 120 characters."""
    groups = collections.defaultdict(list)
    for model_type, reason in reasons.items():
        key = reason.replace(f"'{model_type}'", "'<type>'")
        key = re.sub(r"\b\w+(?:For[A-Z]\w*|Model)\b", "<Model>", key)
        key = re.sub(r"\b\d+\b", "#", key)
        groups[key if len(key) <= 120 else key[:120] + " ..."].append(model_type)  # reasons are cut at 200
    return sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))


def summary(rows: list[dict], seconds: float) -> str:
    """The markdown summary: versions, date, counts per mapping, lists, grouped failure reasons."""
    import peft
    import transformers

    lines = [
        "# Prefix tuning and prompt tuning on every transformers architecture",
        "",
        f"Written by `python -m benchmarks.arch_sweep` on {datetime.date.today().isoformat()}: "
        f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}; "
        f"{seconds:.0f} s. Tiny random models from `prompt_kernels.testing.tiny_models` (2 layers, "
        f"hidden size 64); {PROMPT_LENGTH} prefix tokens; a check passes with a finite loss and a "
        "non-zero gradient on every prompt parameter after a forward with labels and a backward. "
        "Per model type: `arch_sweep.csv`.",
        "",
        "| mapping | model types | tiny models that run | ours | PEFT | both | only ours | only PEFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_mapping = collections.defaultdict(list)
    for r in rows:
        by_mapping[r["mapping"]].append(r)
    sets = {}
    for mapping, rs in by_mapping.items():
        bare = [r["model_type"] for r in rs if r["bare"] == "ok"]
        ours = {r["model_type"] for r in rs if r["ours"] == "ok"}
        theirs = {r["model_type"] for r in rs if r["peft"] == "ok"}
        sets[mapping] = dict(
            both=sorted(ours & theirs),
            only_ours=sorted(ours - theirs),
            only_peft=sorted(theirs - ours),
            neither=sorted(set(bare) - ours - theirs),
        )
        lines.append(
            f"| {mapping} | {len(rs)} | {len(bare)} | {len(ours)} | {len(theirs)} | {len(ours & theirs)} "
            f"| {len(ours - theirs)} | {len(theirs - ours)} |"
        )
    lines += [
        "",
        "Prompt tuning (4 vectors in front of the input embeddings; it needs no route into the layers):",
        "",
        "| mapping | tiny models that run | ours | PEFT | only ours | only PEFT |",
        "|---|---|---|---|---|---|",
    ]
    for mapping, rs in by_mapping.items():
        bare = [r["model_type"] for r in rs if r["bare"] == "ok"]
        ours = {r["model_type"] for r in rs if r.get("ours_pt") == "ok"}
        theirs = {r["model_type"] for r in rs if r.get("peft_pt") == "ok"}
        sets[mapping].update(pt_only_ours=sorted(ours - theirs), pt_only_peft=sorted(theirs - ours))
        sets[mapping]["pt_neither"] = sorted(set(bare) - ours - theirs)
        lines.append(
            f"| {mapping} | {len(bare)} | {len(ours)} | {len(theirs)} | {len(ours - theirs)} | {len(theirs - ours)} |"
        )
    for mapping, rs in by_mapping.items():
        lines += ["", f"## {mapping}", ""]
        for key, title in (
            ("both", "Both"),
            ("only_ours", "Only ours"),
            ("only_peft", "Only PEFT"),
            ("neither", "Neither (the tiny model runs)"),
            ("pt_only_ours", "Prompt tuning, only ours"),
            ("pt_only_peft", "Prompt tuning, only PEFT"),
            ("pt_neither", "Prompt tuning, neither"),
        ):
            names = sets[mapping][key]
            lines.append(f"- {title} ({len(names)}): {', '.join(names) or '-'}")
        no_tiny = {r["model_type"]: r["ours_reason"] for r in rs if r["bare"] != "ok"}
        lines.append(f"- No tiny model ({len(no_tiny)}): " + (", ".join(no_tiny) or "-"))
        for who in CHECKS:  # reasons with numbers as #, model classes as <Model>
            failed = {
                r["model_type"]: r[f"{who}_reason"]
                for r in rs
                if r["bare"] == "ok" and r[who] in ("fail", "crash")
            }
            if not failed:
                continue
            lines += [
                "",
                f"{WHO[who]}: failure reasons ({len(failed)} model types)",
                "",
            ]
            lines += ["| model types | reason |", "|---|---|"]
            for reason, names in _group(failed):
                lines.append(f"| {len(names)}: {', '.join(names)} | {reason.replace('|', '/')} |")
        if no_tiny:
            lines += ["", "No tiny model: reasons", "", "| model types | reason |", "|---|---|"]
            for reason, names in _group(no_tiny):
                lines.append(f"| {len(names)}: {', '.join(names)} | {reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from prompt_kernels.testing import tiny_models as tm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mappings", nargs="+", choices=tm.MAPPINGS, default=list(tm.MAPPINGS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/arch_sweep.csv"))
    ap.add_argument("--types", nargs="+", help="only these model types (default: all)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model type")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    tasks = [(m, t) for m in args.mappings for t in tm.model_types(m) if not args.types or t in args.types]
    rows = sweep(tasks, args.timeout)
    write_csv(rows, args.out)
    md = args.out.with_suffix(".md")
    md.write_text(summary(rows, time.monotonic() - start))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
