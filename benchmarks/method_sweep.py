"""Every method beyond the baselines on every tiny model of a mapping: one training step each.

    OMP_NUM_THREADS=1 python -m benchmarks.method_sweep causal-lm [seq-cls seq2seq]

For SPT, VIP, InfoPrompt, GPC and HiPrompt (default configs, 3 prompt vectors) on each tiny model of
``prompt_kernels.testing.tiny_models``: attach, a forward with the mapping's labels, a backward, detach.
Prints per method how many model types train and the distinct reasons of the others (model class names and digits folded),
so a crash (a raw error from inside a model) stands out from a refusal that names its reason. The
architecture sweep (``benchmarks/arch_sweep.py``, ``python_tests/test_arch_sweep.py``) covers prefix
and prompt tuning.
"""

from __future__ import annotations

import argparse
import collections
import re
import warnings

import torch

METHODS = ("spt", "vip", "infoprompt", "gpc", "hiprompt")


def sweep(mapping: str, methods=METHODS) -> dict[str, dict[str, str]]:
    """``{method: {model_type: "ok" or "<Error>: <first line>"}}``."""
    import prompt_kernels as pk
    import prompt_kernels.methods  # registers the method configs
    from prompt_kernels.configs import config_class
    from prompt_kernels.testing.tiny_models import iter_tiny, tiny_inputs

    results: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for model_type, model in iter_tiny(mapping):
        if isinstance(model, str):
            continue
        try:
            inputs = tiny_inputs(model, mapping)
        except Exception:
            continue
        for method in methods:
            pm = None
            try:
                pm = pk.attach(model, config_class(method)(prompt_length=3)).train()
                out = pm(**inputs)
                loss = out.loss if out.loss is not None else out[0].float().mean()
                loss.backward()
                results[method][model_type] = "ok"
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                results[method][model_type] = f"{type(exc).__name__}: {first}"
            finally:
                if pm is not None and not pm._detached:
                    pm.detach()
    return results


def report(results: dict[str, dict[str, str]]) -> str:
    lines = []
    for method, by_type in results.items():
        ok = sum(v == "ok" for v in by_type.values())
        lines.append(f"== {method}: {ok}/{len(by_type)} train")
        reasons: dict[str, list[str]] = collections.defaultdict(list)
        for t, v in by_type.items():
            if v != "ok":
                folded = re.sub(r"\b[A-Z]\w*(?:For\w+|Model|LMHeadModel)\b", "<Model>", v)
                reasons[re.sub(r"\d+", "#", folded)[:140]].append(t)
        for reason, types in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"   {len(types):3d} {reason}  e.g. {types[:4]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mappings", nargs="+", choices=("causal-lm", "seq-cls", "seq2seq"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    for mapping in args.mappings:
        print(f"# {mapping}")
        print(report(sweep(mapping)))


if __name__ == "__main__":
    main()
