"""Whether ``generate`` may put the prompts into the key/value cache at the prefill.

(The cache route, models without the attention interface, asks the same of generate's own cache:
:func:`cache_route_grows_exactly`.)

``PromptedModel.generate`` moves each layer's prompt keys/values into the front of its
``DynamicLayer`` at the prefill (:class:`~prompt_kernels.patch.attention.PromptedCacheLayer`), so a
decoding step costs what the plain model's does. That is exact only where nothing but the attention
function reads the cached keys/values: a model that transforms them after the cache update (DiffLlama's
value split), derives a mask or bias from their length (Doge's dynamic mask, T5's position bias) or runs a
layer several times per forward (HRM) would see the prompt rows as tokens. No list of such models is kept:
once per PromptedModel, the first ``generate`` decodes one step of a batch of one with random stand-in
prompts both ways (prompts in the cache, prompts joined at every step) and keeps the cache route only
where both give the same logits.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache

from prompt_kernels.patch.attention import PromptedCacheLayer
from prompt_kernels.patch.discovery import cache_keyword, probe_inputs

STAND_IN_ROWS = 2


def _stand_in_hooks(pm) -> dict:
    """Method hooks for the check: random gate-1 prefixes ``[1, Hkv, 2, D]`` at every site, no input
    prompts, no losses (the method itself sees no call)."""
    gen = torch.Generator().manual_seed(0)
    info = pm.info
    prefixes = {}
    for idx in range(info.num_layers):
        hkv, dk, dv = info.kv_shapes[idx]
        key = torch.randn(1, hkv, STAND_IN_ROWS, dk, generator=gen).to(info.device, info.dtype)
        value = torch.randn(1, hkv, STAND_IN_ROWS, dv, generator=gen).to(info.device, info.dtype)
        prefixes[idx] = (key, value, None)
    return {
        "input_prompts": lambda ctx: None,
        "prefix": lambda ctx, idx: prefixes[idx],
        "aux_losses": lambda ctx, output: {},
    }


def _layers(cache) -> list:
    return list(getattr(getattr(cache, "self_attention_cache", cache), "layers", []) or [])


def _decode_step(pm, inject: bool, new_generation):
    """Logits of one decoding step after a prefill, with the stand-in prompts; (logits, prompts cached)."""
    model = pm.model
    inputs = probe_inputs(model)
    enc_dec = pm.info.encoder_decoder
    key = "decoder_input_ids" if enc_dec else "input_ids"
    ids = inputs[key]
    kw = cache_keyword(model)
    gen = new_generation()
    gen.inject = inject
    pm._generation = gen
    # The cache generate() would make (the prefill reads the prompts' destination from the forward's arguments).
    cache = DynamicCache(config=model.config)
    if enc_dec:
        cache = EncoderDecoderCache(cache, DynamicCache(config=model.config))
    first = {**inputs, key: ids[:, :-1], "use_cache": True, kw: cache}
    if not enc_dec:
        first["attention_mask"] = inputs["attention_mask"][:, :-1]
    model(**first)
    cached = any(isinstance(layer, PromptedCacheLayer) for layer in _layers(cache))
    step = {**inputs, key: ids[:, -1:], kw: cache}
    step.pop("use_cache", None)
    logits = model(**step).logits[:, -1].float()
    return logits, cached


def cache_route_is_exact(pm, new_generation) -> bool:
    """True when one decoding step with the prompts in the cache gives the logits of the step with the
    prompts joined in the attention (random stand-in prompts; ``pm``'s state is restored)."""
    model = pm.model
    if not getattr(model, "can_generate", lambda: False)() or cache_keyword(model) is None:
        return False
    saved = pm._generation
    try:
        with pm.method_stand_ins(_stand_in_hooks(pm)), torch.no_grad():
            ours, cached = _decode_step(pm, True, new_generation)
            if not cached:
                return False
            ref, _ = _decode_step(pm, False, new_generation)
    except Exception:
        return False  # the cache route does not run on this model: the prompts stay out of the cache
    finally:
        pm._generation = saved
    return _same_logits(ours, ref, pm.info.dtype)


def _same_logits(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """Finite and equal within the model dtype's rounding (relative to the largest logit)."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = max(float(ref.abs().max()), 1.0)
    return (
        ours.shape == ref.shape
        and bool(torch.isfinite(ours).all())
        and bool((ours - ref).abs().max() <= tol * scale)
    )


def cache_route_grows_exactly(pm, new_generation) -> bool:
    """The cache route: True when a short greedy ``generate`` with random stand-in prompts gives the same
    logits with the prompts put into generate's own cache at the prefill (which then grows with the
    tokens) as with every step recomputed without a cache. Decoder-only models whose forward takes the
    cache only; ``pm``'s state is restored."""
    model, layout = pm.model, pm.info.layout
    if (
        pm.info.encoder_decoder
        or layout.cache_module is not None
        or layout.cache_wrap != "dynamic"
        or not getattr(model, "can_generate", lambda: False)()
    ):
        return False
    inputs = probe_inputs(model)
    inputs.pop("use_cache", None)
    kw = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    kw["pad_token_id"] = int(getattr(model.config, "pad_token_id", None) or 0)
    saved = pm._generation
    logits = {}
    try:
        with pm.method_stand_ins(_stand_in_hooks(pm)), torch.no_grad():
            for grows in (True, False):
                gen = new_generation()
                gen.cache_grows = grows
                pm._generation = gen
                out = model.generate(**inputs, use_cache=grows, **kw)
                if grows and gen.cache_rows == 0:
                    return False  # the prompts never reached generate's cache
                logits[grows] = torch.stack(out.logits, 1).float()
    except Exception:
        return False
    finally:
        pm._generation = saved
    return _same_logits(logits[True], logits[False], pm.info.dtype)
