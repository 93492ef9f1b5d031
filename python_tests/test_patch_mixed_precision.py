"""Every method under ``torch.autocast`` (bf16, fp16) and on bf16 / fp16 weights, in training and eval,
on a causal and an encoder model: prompts are cast to the attention's compute dtype where they are
used, and gradients reach the prompt parameters in their own dtype (float32).
"""

from __future__ import annotations

import pytest
import torch
from patch_helpers import batch, one_thread, tiny_model  # noqa: F401  (autouse fixture)

import prompt_kernels as pk


def configs():
    return {
        "prompt_tuning": pk.PromptTuningConfig(prompt_length=3),
        "prefix_tuning": pk.PrefixTuningConfig(prompt_length=3),
        "spt": pk.SPTConfig(prompt_length=3),
        "vip": pk.VIPConfig(prompt_length=3),
        "infoprompt": pk.InfoPromptConfig(prompt_length=3),
        "gpc": pk.GPCConfig(prompt_length=3),
        "hiprompt": pk.HiPromptConfig(prompt_length=3),
    }


METHODS = tuple(configs())
SETTINGS = ("autocast-bf16", "autocast-fp16", "weights-bf16", "weights-fp16")


def _run(pm, settings, ids, mask, labels):
    if settings.startswith("autocast"):
        dtype = torch.bfloat16 if settings.endswith("bf16") else torch.float16
        with torch.autocast("cpu", dtype=dtype):
            return pm(input_ids=ids, attention_mask=mask, labels=labels)
    return pm(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("model_type,head", [("llama", "cls"), ("bert", "cls")])
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_in_mixed_precision(method, model_type, head, settings, mode):
    model = tiny_model(model_type, head)
    if settings.startswith("weights"):
        model.to(torch.bfloat16 if settings.endswith("bf16") else torch.float16)
    ids, mask = batch(model_type)
    labels = torch.randint(0, model.config.num_labels, (ids.shape[0],))
    pm = pk.attach(model, configs()[method])
    pm.train(mode == "train")
    if mode == "eval":
        with torch.no_grad():
            out = _run(pm, settings, ids, mask, labels)
        assert torch.isfinite(out.logits.float()).all()
        return
    out = _run(pm, settings, ids, mask, labels)
    assert torch.isfinite(out.loss.float())
    out.loss.backward()
    params = list(pm.method.prompt_parameters())
    assert params and all(p.dtype == torch.float32 for p in params)
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and sum(float(g.float().abs().sum()) for g in grads) > 0
