"""The ``prompt-kernels`` command line: ``train`` a prompt method on a classification task, ``predict``
with a trained run, ``bench``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import warnings

METHODS = ("prompt-tuning", "prefix-tuning", "spt", "vip", "infoprompt", "gpc", "hiprompt")
DEFAULT_METHOD = "prefix-tuning"


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v

    return parse


def _non_negative(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt-kernels", description="Fast multi-layer soft-prompt tuning.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a prompt method on a text classification task",
        description="Train prompts and a linear head on a frozen model. --out is a checkpoint, rewritten "
        "every --save-every steps, on SIGINT/SIGTERM and at the end; --resume DIR continues it with the "
        "settings it was started with (arguments that conflict with them are refused).",
    )
    # None = the default, or with --resume the value the run was started with.
    t.add_argument("--method", choices=METHODS, default=None, help=f"default {DEFAULT_METHOD}")
    t.add_argument(
        "--model", default=None, help="minilm (default) | smollm2 | a local transformers model folder"
    )
    t.add_argument(
        "--task",
        default=None,
        help="mr (default: embedded movie reviews) | a CSV file with columns text,label",
    )
    t.add_argument(
        "--steps",
        type=_positive(int),
        default=None,
        help="optimizer steps (default 300); with --resume of a finished run: this many more",
    )
    t.add_argument("--batch-size", type=_positive(int), default=None, help="default 32")
    t.add_argument("--lr", type=_positive(float), default=None, help="learning rate (default: per method)")
    t.add_argument("--prompt-length", type=_positive(int), default=None, help="default 10")
    t.add_argument(
        "--max-length",
        type=_positive(int),
        default=None,
        help="tokens per example after truncation (default 64)",
    )
    t.add_argument("--seed", type=int, default=None, help="default 0")
    t.add_argument(
        "--eval-size", type=_positive(int), default=None, help="evaluate on at most this many test rows"
    )
    t.add_argument(
        "--out",
        default=None,
        help="run folder: prompts, head, optimizer and RNG state, metrics (default runs/latest; with "
        "--resume, the resumed folder)",
    )
    t.add_argument("--resume", default=None, help="a folder written by an earlier train run to continue from")
    t.add_argument(
        "--save-every",
        type=_non_negative,
        default=None,
        help="write a checkpoint every N steps (default 50; 0: only on a signal and at the end)",
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar and progress lines")
    r = sub.add_parser(
        "predict",
        help="run a saved run on a CSV and write its predictions",
        description="Predict the labels of a CSV (column text; with a label column, accuracy is reported) "
        "with the prompts and head of a train run. Without --out the predictions go to stdout as CSV and the "
        "summary line to stderr; with --out the summary goes to stdout.",
    )
    r.add_argument("--run", required=True, help="a folder written by prompt-kernels train")
    r.add_argument("--task", required=True, help="a CSV file with a column text (and optionally label)")
    r.add_argument("--out", default=None, help="write the predictions to this CSV file")
    r.add_argument("--batch-size", type=_positive(int), default=64)
    r.add_argument("--max-length", type=_positive(int), default=None, help="default: the run's")
    b = sub.add_parser("bench", help="run the kernel and end-to-end benchmarks (CSV + PNG plots)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--only", default=None)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"prompt-kernels: warning: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.command == "train":
                from prompt_kernels.train import run_training

                result = run_training(args)
                print(json.dumps(result))
                return 0
            if args.command == "predict":
                return _predict(args)
            if args.command == "bench":
                return _bench(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"prompt-kernels: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prompt-kernels: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:
        from prompt_kernels.train import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"prompt-kernels: {exc}", file=sys.stderr)
            return 128 + exc.signum
        raise
    return 1


def _predict(args) -> int:
    from prompt_kernels.train import run_predict

    summary, rows = run_predict(args)
    columns = list(rows[0]) if rows else ["text", "prediction", "confidence"]
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            _write_rows(f, columns, rows)
        os.replace(tmp, args.out)
        print(json.dumps(summary))
    else:
        _write_rows(sys.stdout, columns, rows)
        print(json.dumps(summary), file=sys.stderr)
    return 0


def _write_rows(f, columns, rows) -> None:
    w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)


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
