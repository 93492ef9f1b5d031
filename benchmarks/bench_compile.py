"""``torch.compile`` of a whole prompted model: MiniLM + P-tuning v2 training step, compiled vs eager.

One step = forward, backward, AdamW step of ``BertForSequenceClassification`` on MiniLM (6 layers,
d = 384), batch 32, length 64, 10 prompt tokens, train mode (the model's dropout on), as in
``bench_patch.py``:

- ``prompt_kernels``: ``attach(model, PrefixTuningConfig(prompt_length=10))``, eager;
- ``prompt_kernels_compiled``: the same PromptedModel under ``torch.compile(pm, fullgraph=True)``
  (inductor; the optimiser step stays eager);
- ``peft`` / ``peft_compiled``: PEFT's prefix tuning, eager and under ``torch.compile`` (no
  ``fullgraph``: PEFT builds a key/value cache object per call);
- ``frozen_floor`` / ``frozen_floor_compiled``: the frozen model without prompts, gradients to
  ``inputs_embeds`` (the backward every prompt method needs), eager and compiled.

Compilation happens in the untimed warm-up calls.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.bench_patch import P, _batch, _floor_fn, _minilm_classifier, _step_fn, peft_task_type
from benchmarks.common import Case

B, T = 32, 64


def cases(quick: bool) -> list[Case]:
    import peft

    import prompt_kernels as pk

    base = _minilm_classifier()
    base.config.problem_type = "single_label_classification"  # set by the first loss call otherwise
    ids, mask, labels = _batch(base.config.vocab_size)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    size = f"MiniLM cls B{B} T{T} p{P}"

    ours = pk.attach(copy.deepcopy(base), pk.PrefixTuningConfig(prompt_length=P)).train()
    ours_c = pk.attach(copy.deepcopy(base), pk.PrefixTuningConfig(prompt_length=P)).train()
    compiled = torch.compile(ours_c, fullgraph=True)

    def peft_model():
        m = peft.get_peft_model(
            copy.deepcopy(base),
            peft.PrefixTuningConfig(task_type=peft_task_type("SEQ_CLS", base), num_virtual_tokens=P),
        )
        for name, prm in m.named_parameters():
            prm.requires_grad_("prompt_encoder" in name)
        return m.train()

    theirs, theirs_c = peft_model(), peft_model()
    floor = copy.deepcopy(base)
    for prm in floor.parameters():
        prm.requires_grad_(False)
    floor_c = torch.compile(floor, fullgraph=True)

    def case(provider, fn):
        return Case(kernel="compiled_train_step", provider=provider, mode="step", size=size, fn=fn)

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    return [
        case("prompt_kernels", _step_fn(ours, list(ours.prompt_parameters()), kwargs)),
        case("prompt_kernels_compiled", _step_fn(compiled, list(ours_c.prompt_parameters()), kwargs)),
        case("peft", _step_fn(theirs, trainable(theirs), kwargs)),
        case("peft_compiled", _step_fn(torch.compile(theirs_c), trainable(theirs_c), kwargs)),
        case("frozen_floor", _floor_fn(floor, ids, mask, labels)),
        case("frozen_floor_compiled", _floor_fn(floor_c, ids, mask, labels)),
    ]


def _cpu_time_comparison(repeats: int, threads: int) -> None:
    """The cases interleaved, medians of wall and process CPU time; ratios to eager prompt_kernels."""
    import time

    from benchmarks.common import cpu_time_interleaved, machine_name

    torch.set_num_threads(threads)
    cs = cases(quick=False)
    first_call = {}
    for c in cs:
        w0 = time.perf_counter()
        c.fn()  # compiles the compiled ones
        first_call[c.provider] = time.perf_counter() - w0
        c.fn()
    wall, cpu = cpu_time_interleaved(cs, repeats)
    ours = cpu["prompt_kernels"]
    print(f"machine: {machine_name()}; {repeats} interleaved repeats, medians")
    print(
        "| provider | first call s | wall ms | CPU ms | CPU / eager prompt_kernels |\n|---|---:|---:|---:|---:|"
    )
    for p, m in cpu.items():
        print(f"| {p} | {first_call[p]:.1f} | {wall[p] * 1e3:.0f} | {m * 1e3:.0f} | {m / ours:.3f} |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="compiled vs eager MiniLM training step (CPU time)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    _cpu_time_comparison(args.repeats, args.threads)
