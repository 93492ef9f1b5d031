"""Models that compute attention in their own code (transformers will not switch their attention
implementation) but take a key/value cache: prefix prompts travel as a pre-filled cache."""

from __future__ import annotations

import pytest
import torch
from patch_helpers import assert_generate_equals_recompute, greedy_logits, one_thread  # noqa: F401

import prompt_kernels as pk
from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs


@pytest.mark.parametrize("model_type", ["bloom", "xglm", "gpt_neo"])
def test_cache_route_equals_the_model_given_the_prompts_as_its_cache(model_type):
    """The prompts as the model's own cache, the mask with ones in front, and the tokens at positions
    0..T-1 (given explicitly to the reference where the model takes position ids)."""
    import inspect

    from transformers import DynamicCache

    model = build_tiny(model_type, "causal-lm")
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
        base = pm.detach()
        if "position_ids" in inspect.signature(base.forward).parameters:
            T = inputs["input_ids"].shape[1]
            kwargs["position_ids"] = torch.arange(T).expand(B, -1)
        ref = base(**kwargs)
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
    # RemBERT as a decoder: its generate does not decode exactly with the prompts in generate's cache, so
    # every step is recomputed, and asking for the cache is refused by name.
    model = build_tiny("rembert", "causal-lm")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    with pytest.raises(NotImplementedError, match=r"generate\(use_cache=True\)"):
        pm.generate(input_ids=inputs["input_ids"], max_new_tokens=2, use_cache=True)
    assert pm._cache_route_exact is False


@pytest.mark.parametrize("model_type,target", [("bert", "base"), ("roberta", "base"), ("bert", "encoder")])
def test_cache_handed_to_the_base_model_equals_the_interface_route(monkeypatch, model_type, target):
    """A classification head that does not pass a cache on: the cache goes to its base model (or, where
    the base model takes none either, as TAPAS's, to the encoder below it). Forced onto a model that also
    has the interface route, both give the same loss, logits and prompt gradients (the prompts are
    keys/values in front, the tokens keep their positions and padding mask)."""
    import prompt_kernels.patch.discovery as discovery
    import prompt_kernels.patch.model as patch_model
    from prompt_kernels.patch.discovery import NoAttentionInterface

    model = build_tiny(model_type, "seq-cls").eval()
    inputs = tiny_inputs(model, "seq-cls", batch=3, length=5, padding="right", seed=1)
    config = pk.PrefixTuningConfig(prompt_length=3)

    def run(pm):
        out = pm(**inputs)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in pm.method.parameters()]

    pm = pk.attach(model, config)
    assert pm.info.layout.kind == "interface"
    with torch.no_grad():
        for p in pm.method.parameters():
            p.normal_()
    state = {k: v.clone() for k, v in pm.method.state_dict().items()}
    ref = run(pm)
    model = pm.detach()

    def no_interface(*args, **kwargs):
        raise NoAttentionInterface("forced")

    monkeypatch.setattr(patch_model, "discover", no_interface)
    expected = model.base_model
    if target == "encoder":
        keyword = discovery.cache_keyword
        monkeypatch.setattr(
            discovery, "cache_keyword", lambda m: None if m is model.base_model else keyword(m)
        )
        expected = model.base_model.encoder
    pm = pk.attach(model, config)
    assert pm.info.layout.kind == "cache" and pm.info.layout.cache_module is expected
    pm.method.load_state_dict(state)
    got = run(pm)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    pm.detach()


def test_cache_handed_to_the_base_model_of_a_model_without_the_interface():
    """MegatronBERT's classification head calls its base model without a cache: prompts reach every
    layer there (the logits move with them, and equal the base model given the cache by hand)."""
    from transformers import DynamicCache

    model = build_tiny("megatron-bert", "seq-cls").eval()
    inputs = tiny_inputs(model, "seq-cls", batch=2, length=6, padding="right", seed=2)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=4))
    assert pm.info.layout.kind == "cache" and pm.info.layout.cache_module is model.base_model
    with torch.no_grad():
        pm.method.embedding.weight.normal_()
        out = pm(**inputs)
        kv = pm.method.all_key_values()
        B, T = inputs["input_ids"].shape
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
        mask = torch.cat(
            [torch.ones(B, 4, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], 1
        )
        base = pm.detach()
        hidden = base.bert(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            token_type_ids=inputs.get("token_type_ids"),
            position_ids=torch.arange(T).expand(B, -1),
            cache=cache,
        )
        ref = base.classifier(base.dropout(hidden[1]))
        plain = base(**inputs).logits
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits, plain, atol=1e-3)


def test_cache_target_is_the_outermost_module_holding_every_cache_taker():
    """Where neither the model nor its base model takes a cache, the cache goes to the outermost module
    that does, only if every module taking one lies inside it (one stack of layers): never to one of two
    stacks, nor to a single layer."""
    from torch import nn

    from prompt_kernels.patch.discovery import cache_target

    class Layer(nn.Module):
        def forward(self, x, cache=None):
            return x

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, x, past_key_values=None):
            return x

    class Model(nn.Module):
        def __init__(self, stacks):
            super().__init__()
            self.stacks = nn.ModuleList([Stack() for _ in range(stacks)])

        def forward(self, x):
            return x

    one = Model(1)
    assert cache_target(one) == ("past_key_values", one.stacks[0])
    assert cache_target(Model(2)) == (None, None)  # two stacks: which one the prompts belong to is unknown
    layers_only = Model(1)
    layers_only.stacks[0].forward = lambda x: x  # the stack takes no cache, its two layers do
    assert cache_target(layers_only) == (None, None)


def test_cache_handed_to_the_encoder_of_a_base_model_without_one():
    """TAPAS: neither the head nor the base model takes a cache, its encoder does. Prompts reach every
    layer there (the logits move with them, and equal the model whose encoder is given the cache by
    hand, with the padding mask widened by the prompt columns)."""
    from transformers import DynamicCache

    model = build_tiny("tapas", "seq-cls").eval()
    inputs = tiny_inputs(model, "seq-cls", batch=2, length=6, padding="right", seed=2)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=4))
    assert pm.info.layout.kind == "cache" and pm.info.layout.cache_module is model.tapas.encoder
    torch.manual_seed(0)
    with torch.no_grad():
        pm.method.embedding.weight.normal_()
        out = pm(**inputs)
        B = inputs["input_ids"].shape[0]
        cache = DynamicCache()
        for i, (k, v) in enumerate(pm.method.all_key_values()):
            cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
        mask = torch.cat(
            [torch.ones(B, 4, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], 1
        )
        base = pm.detach()
        hook = base.tapas.encoder.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "cache": cache}), with_kwargs=True
        )
        try:
            ref = base(**{**inputs, "attention_mask": mask}).logits
        finally:
            hook.remove()
        plain = base(**inputs).logits
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert (out.logits - plain).abs().max() > 1e-4  # TAPAS's tiny classifier gives logits of about 0.05


@pytest.mark.parametrize(
    "model_type,grows",
    [("bloom", True), ("gpt_neo", True), ("xglm", True), ("mpt", True), ("megatron-bert", False)],
)
def test_generate_on_the_cache_route_equals_recomputing_every_step(model_type, grows):
    """generate() on the cache route: the prompts go into generate's own cache at the prefill and stay in
    front while it grows (where the first generate's check finds that exact), else every step is
    recomputed; either way each step's logits equal a prompted forward over everything so far, and differ
    from the plain model's. ``cache_prompts = False`` recomputes too."""
    model = build_tiny(model_type, "causal-lm").eval()
    ids = tiny_inputs(model, "causal-lm", batch=2, length=5, seed=5)["input_ids"]
    plain = greedy_logits(model, ids, 3)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    assert pm.info.layout.kind == "cache"
    with torch.no_grad():
        pm.method.embedding.weight.normal_()
    lengths = []
    spy = model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    got = greedy_logits(pm, ids, 3)
    spy.remove()
    assert pm._cache_route_exact is grows
    # Growing: one token per decoding step (after the first generate's check); else the whole sequence.
    assert lengths[-3:] == ([5, 1, 1] if grows else [5, 6, 7])
    torch.testing.assert_close(assert_generate_equals_recompute(pm, ids, 3), got, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    pm.cache_prompts = False
    torch.testing.assert_close(assert_generate_equals_recompute(pm, ids, 3), got, rtol=1e-4, atol=1e-5)
    pm.detach()


def test_decoder_positions_do_not_move_behind_prompts_in_its_cache():
    """An encoder-decoder on the cache route (MVP): the decoder's positional embedding counts from 0, as
    without prompts (it would count from the cache length, the prompt rows)."""
    model = build_tiny("mvp", "seq2seq").eval()
    inputs = tiny_inputs(model, "seq2seq", batch=2, length=5, seed=6)
    import inspect

    embed = model.get_decoder().embed_positions
    names = list(inspect.signature(embed.forward).parameters)
    seen = []

    def spy(m, args, kwargs):  # runs after the patch layer's hook (registered later)
        seen.append({**dict(zip(names, args)), **kwargs}.get("cache_length", 0))

    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    assert pm.info.layout.kind == "cache" and pm.info.encoder_decoder
    handle = embed.register_forward_pre_hook(spy, with_kwargs=True)
    pm(**inputs)
    assert seen == [0]
    with pm.disabled():  # the same spy sees the cache length where the model has a cache of its own
        from transformers import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        enc = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        dec = inputs["input_ids"][:, :3]
        model(**enc, decoder_input_ids=dec, use_cache=True, cache=cache)
        seen.clear()
        model(**enc, decoder_input_ids=dec[:, :1], cache=cache)
    assert seen and seen[0] > 0
    handle.remove()
    pm.detach()


@pytest.mark.parametrize(
    "model_type,mapping",
    [("bloom", "causal-lm"), ("gpt_neo", "causal-lm"), ("megatron-bert", "seq-cls"), ("mvp", "seq2seq")],
)
def test_cache_route_under_gradient_checkpointing_equals_without(model_type, mapping):
    """Recomputed layers see the same prompt keys (the prompt cache never grows; checkpointed layers keep
    it for the prompted forward only): loss and prompt gradients as without checkpointing."""
    model = build_tiny(model_type, mapping)
    inputs = tiny_inputs(model, mapping, batch=2, length=6, seed=7)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3)).train()
    assert pm.info.layout.kind == "cache"
    with torch.no_grad():
        pm.method.embedding.weight.normal_()

    def step():  # the same dropout masks (checkpointing replays them)
        torch.manual_seed(0)
        pm.method.zero_grad()
        loss = pm(**inputs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in pm.method.parameters()]

    ref = step()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = step()
    model.gradient_checkpointing_disable()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(got[1], ref[1]):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules())
    pm.detach()


def test_beam_search_on_the_cache_route_both_ways():
    """Beam search reorders generate's cache: with the prompts in it (grown) and with every step
    recomputed (an empty cache carried between steps), the same beams and scores."""
    model = build_tiny("gpt_neo", "causal-lm").eval()
    ids = tiny_inputs(model, "causal-lm", batch=2, length=5, seed=8)["input_ids"]
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    with torch.no_grad():
        pm.method.embedding.weight.normal_()
    kw = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=4,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    grown = pm.generate(input_ids=ids, **kw)
    assert pm._cache_route_exact is True
    pm.cache_prompts = False
    recomputed = pm.generate(input_ids=ids, **kw)
    assert torch.equal(grown.sequences, recomputed.sequences)
    torch.testing.assert_close(grown.sequences_scores, recomputed.sequences_scores, rtol=1e-4, atol=1e-5)
    pm.detach()
