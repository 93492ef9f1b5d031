"""generate() with prompts equals a manual greedy loop (no cache, full recompute every step)."""

from __future__ import annotations

import inspect

import pytest
import torch
from patch_helpers import DeepPromptTestConfig, SequenceTestConfig, batch, one_thread, tiny_model  # noqa: F401

import prompt_kernels as pk

STEPS = 5


def greedy(pm, ids, mask, steps):
    """Greedy decoding with the whole sequence re-run at every step; positions from the mask (as generate)."""
    ids, mask, logits = ids.clone(), mask.clone(), []
    for _ in range(steps):
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        last = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        logits.append(last)
        nxt = last.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, torch.stack(logits, 1)


def _counting(obj, name, counter):
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        counter.append(1)
        return fn(*a, **k)

    setattr(obj, name, wrapped)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("style", ["prefix", "input", "gated_deep"])
def test_generate_equals_manual_greedy_loop(model_type, style):
    model = tiny_model(model_type, "lm")
    cfg = {
        "prefix": pk.PrefixTuningConfig(prompt_length=3),
        "input": pk.PromptTuningConfig(prompt_length=3),
        "gated_deep": DeepPromptTestConfig(prompt_length=2, gate=0.6),
    }[style]
    pm = pk.attach(model, cfg)
    with torch.no_grad():  # make the prompts matter
        for p in pm.method.parameters():
            p.mul_(3.0)
    ids, mask = batch(model_type, B=2, T=5, pad_last=0)
    mask[0, :2] = 0  # left padding, as for generation
    ids[0, :2] = 0
    calls = []
    hook = {"prefix": "all_key_values", "input": "input_prompts", "gated_deep": "prefix"}[style]
    _counting(pm.method, hook, calls)
    with torch.no_grad():
        out = pm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        n_generate_calls = len(calls)
        ref_ids, ref_logits = greedy(pm, ids, mask, STEPS)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits, rtol=1e-4, atol=1e-5)
    # The prompts are computed once per generate call (on the prefill), not per token.
    expected = model.config.num_hidden_layers if style == "gated_deep" else 1
    assert n_generate_calls == expected
    assert not torch.allclose(torch.stack(out.logits, 1), _plain_logits(model, pm, ids, mask), atol=1e-3)


def _plain_logits(model, pm, ids, mask):
    with pm.disabled():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(out.logits, 1)


@pytest.mark.parametrize("cache_kwarg", ["past_key_values", "cache"])
def test_manual_cached_decoding_with_input_prompts(cache_kwarg):
    """A forward with a cache from a prompted prefill: the mask gets the prompt's ones, positions continue.

    The cache goes in under either keyword: ``cache`` (transformers >= 5.24, what ``generate`` passes)
    or ``past_key_values`` (before; still accepted, deprecated, by 5.24)."""
    model = tiny_model("llama", "lm")
    if cache_kwarg == "cache" and "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("transformers < 5.24: the forward has no `cache` parameter")
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    ids, mask = batch("llama", B=2, T=6, pad_last=0)
    with torch.no_grad():
        full = pm(input_ids=ids, attention_mask=mask).logits[:, -1]
        pre = pm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        past = pre.cache if cache_kwarg == "cache" else pre.past_key_values
        step = pm(input_ids=ids[:, -1:], attention_mask=mask, **{cache_kwarg: past}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_generate_refuses_sequence_style_and_non_generative_models():
    pm = pk.attach(tiny_model("llama", "lm"), SequenceTestConfig(prompt_length=2))
    with pytest.raises(NotImplementedError, match="sequence"):
        pm.generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=2)
    pm = pk.attach(tiny_model("bert", "cls"), pk.PrefixTuningConfig(prompt_length=2))
    with pytest.raises(TypeError, match="cannot generate"):
        pm.generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=2)
