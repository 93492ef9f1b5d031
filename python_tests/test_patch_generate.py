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


def _generate(pm, ids, mask, **kw):
    with torch.no_grad():
        return pm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )


def _scaled(pm, factor=3.0):
    with torch.no_grad():  # make the prompts matter
        for p in pm.method.parameters():
            p.mul_(factor)
    return pm


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
    pm = _scaled(pk.attach(model, cfg))
    ids, mask = batch(model_type, B=2, T=5, pad_last=0)
    mask[0, :2] = 0  # left padding, as for generation
    ids[0, :2] = 0
    calls = []
    hook = {"prefix": "all_key_values", "input": "input_prompts", "gated_deep": "prefix"}[style]
    _counting(pm.method, hook, calls)
    out = _generate(pm, ids, mask)
    n_generate_calls = len(calls)
    with torch.no_grad():
        ref_ids, ref_logits = greedy(pm, ids, mask, STEPS)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits, rtol=1e-4, atol=1e-5)
    # The prompts are computed once per generate call (on the prefill), not per token.
    expected = model.config.num_hidden_layers if style == "gated_deep" else 1
    assert n_generate_calls == expected
    assert not torch.allclose(torch.stack(out.logits, 1), _plain_logits(model, pm, ids, mask), atol=1e-3)


def _plain_logits(model, pm, ids, mask):
    with pm.disabled():
        out = _generate(model, ids, mask)
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


@pytest.mark.parametrize("style", ["prefix", "gated_deep"])
def test_generate_puts_prompts_in_the_cache_at_prefill(style, monkeypatch):
    """The prefill moves every layer's prompts into its DynamicLayer (lengths still count the tokens), and
    the prefill and each decoding step are then one wrapped attention call per layer (the prompted op is not
    called)."""
    from prompt_kernels.patch import attention

    model = tiny_model("llama", "lm")
    cfg = {
        "prefix": pk.PrefixTuningConfig(prompt_length=3),
        "gated_deep": DeepPromptTestConfig(prompt_length=2, gate=0.6),
    }[style]
    pm = _scaled(pk.attach(model, cfg))
    ids, mask = batch("llama", B=2, T=5, pad_last=0)
    mask[0, :2] = 0
    _generate(pm, ids, mask)  # the first generate also checks, once, that the cache route is exact here
    assert pm._cache_route_exact is True
    op_calls = []
    for name in ("cpu_inference", "gated_prefix_attention"):
        fn = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _fn=fn, **k: (op_calls.append(1), _fn(*a, **k))[1])
    out = _generate(pm, ids, mask)
    cache = out.past_key_values
    P = cfg.prompt_length
    L = model.config.num_hidden_layers
    assert [type(layer) for layer in cache.layers] == [attention.PromptedCacheLayer] * L
    assert cache.get_seq_length() == ids.shape[1] + STEPS - 1  # the tokens only
    assert all(layer.keys.shape[2] == P + ids.shape[1] + STEPS - 1 for layer in cache.layers)
    assert op_calls == []  # prefill and decoding steps: one wrapped call over [prompts; cache] per layer
    ref_ids, ref_logits = greedy(pm, ids, mask, STEPS)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits, rtol=1e-4, atol=1e-5)
    # The returned cache keeps working in a plain forward (its prompts are not added a second time).
    nxt = out.sequences[:, -1:]
    full_mask = torch.cat([mask, torch.ones(2, STEPS, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        step = pm(input_ids=nxt, attention_mask=full_mask, position_ids=pos[:, -1:], past_key_values=cache)
        step = step.logits[:, -1]
        full = pm(input_ids=out.sequences, attention_mask=full_mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    cache.reset()
    assert type(cache.layers[0]) is not attention.PromptedCacheLayer


def test_generate_beam_search_and_static_cache_agree():
    """Beam search (the cache is reordered per step) with the prompts in a DynamicCache equals the same search
    with a static cache, whose layers keep the prompts out of the cache (the two-segment path)."""
    model = tiny_model("llama", "lm")
    pm = _scaled(pk.attach(model, pk.PrefixTuningConfig(prompt_length=3)))
    ids, mask = batch("llama", B=2, T=5, pad_last=0)
    dynamic = _generate(pm, ids, mask, num_beams=3)
    static = _generate(pm, ids, mask, num_beams=3, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    torch.testing.assert_close(
        torch.stack(dynamic.logits, 1), torch.stack(static.logits, 1), rtol=1e-4, atol=1e-5
    )


def test_generate_with_sliding_window_layers_keeps_prompts_visible():
    """Sliding-window cache layers are not given the prompts (their window would evict them): the prompts stay
    visible to every query, as in a full recompute."""
    model = tiny_model("mistral", "lm", sliding_window=3)
    pm = _scaled(pk.attach(model, pk.PrefixTuningConfig(prompt_length=3)))
    ids, mask = batch("mistral", B=2, T=6, pad_last=0)
    out = _generate(pm, ids, mask)
    ref_ids, ref_logits = greedy(pm, ids, mask, STEPS)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["diffllama", "doge"])
def test_generate_keeps_prompts_out_of_the_cache_where_the_model_reads_it(model_type):
    """DiffLlama splits the cached values across heads after the cache update and Doge derives a mask from
    them: there the prompts would be read as tokens, the first generate's check sees it, and every step
    joins the prompts in the attention instead (same tokens and logits as a full recompute)."""
    from prompt_kernels.patch.attention import PromptedCacheLayer
    from prompt_kernels.testing.tiny_models import build_tiny

    model = build_tiny(model_type, "causal-lm")
    pm = _scaled(pk.attach(model, pk.PrefixTuningConfig(prompt_length=3)))
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out = _generate(pm, ids, mask)
    assert pm._cache_route_exact is False
    assert not any(isinstance(layer, PromptedCacheLayer) for layer in out.past_key_values.layers)
    ref_ids, ref_logits = greedy(pm, ids, mask, STEPS)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref_logits, rtol=1e-4, atol=1e-5)
