"""Models that compute attention in their own code (transformers will not switch their attention
implementation) but take a key/value cache: prefix prompts travel as a pre-filled cache."""

from __future__ import annotations

import pytest
import torch
from patch_helpers import one_thread  # noqa: F401  (autouse fixture)

import prompt_kernels as pk
from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs


def test_cache_route_equals_the_model_given_the_prompts_as_its_cache():
    from transformers import DynamicCache

    model = build_tiny("bloom", "causal-lm")
    inputs = tiny_inputs(model, "causal-lm")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    assert pm.info.layout.kind == "cache" and pm.info.num_layers == 2
    with torch.no_grad():
        pm.method.embedding.weight.normal_()
        out = pm(**inputs)
        kv = pm.method.all_key_values()
        B = inputs["input_ids"].shape[0]
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
        mask = torch.cat(
            [torch.ones(B, 3, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], 1
        )
        kwargs = {**inputs, "attention_mask": mask, "cache": cache}
        ref = pm.detach()(**kwargs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_cache_route_refuses_what_it_cannot_do():
    model = build_tiny("bloom", "causal-lm")
    inputs = tiny_inputs(model, "causal-lm")
    for config in (pk.SPTConfig(prompt_length=3), pk.HiPromptConfig(prompt_length=3)):
        pm = pk.attach(model, config)
        with pytest.raises(NotImplementedError, match="key/value cache"):
            pm(**inputs)
        model = pm.detach()
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    with pytest.raises(NotImplementedError, match="generate"):
        pm.generate(input_ids=inputs["input_ids"], max_new_tokens=2)
