"""The ``prompt-kernels`` command line: ``train`` a prompt method on a classification task, ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys

METHODS = ("prompt-tuning", "prefix-tuning", "spt", "vip", "infoprompt", "gpc", "hiprompt")
DEFAULT_METHOD = "prefix-tuning"


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt-kernels", description="Fast multi-layer soft-prompt tuning.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a prompt method on a text classification task")
    t.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    t.add_argument("--model", default="minilm", help="minilm | smollm2 | a local transformers model folder")
    t.add_argument(
        "--task", default="mr", help="mr (embedded movie reviews) | a CSV file with columns text,label"
    )
    t.add_argument("--steps", type=_positive(int), default=300)
    t.add_argument("--batch-size", type=_positive(int), default=32)
    t.add_argument("--lr", type=_positive(float), default=None, help="learning rate (default: per method)")
    t.add_argument("--prompt-length", type=_positive(int), default=10)
    t.add_argument(
        "--max-length", type=_positive(int), default=64, help="tokens per example after truncation"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--eval-size", type=_positive(int), default=None, help="evaluate on at most this many test rows"
    )
    t.add_argument("--out", default="runs/latest", help="folder for the prompts, the head and the metrics")
    t.add_argument("--resume", default=None, help="a folder written by an earlier train run to continue from")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b = sub.add_parser("bench", help="run the kernel and end-to-end benchmarks (CSV + PNG plots)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--only", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from prompt_kernels.train import run_training

            result = run_training(args)
            print(json.dumps(result))
            return 0
        if args.command == "bench":
            return _bench(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"prompt-kernels: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        raise FileNotFoundError("prompt-kernels bench runs from a source checkout (benchmarks/ not found)")
    sys.path.insert(0, root)
    from benchmarks.run import main as bench_main

    argv = (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else [])
    return bench_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
