"""The cache route's cache: prompt rows that every update returns in front, and that never grow.

On the cache route (models that compute attention in their own code but read a key/value cache) a
prompted forward hands the model a cache holding only the prompts. A plain ``DynamicLayer`` would append
each call's keys/values to it, so a layer run twice in one forward (gradient-checkpoint recomputation,
looped layers) would see its own first run's keys as extra tokens. :class:`PromptPrefixLayer` returns
``[prompts; new]`` from ``update`` and keeps only the prompts: every call of a layer sees the same keys.
An encoder-decoder's cross-attention cache is made of empty such layers and never reports itself
updated, so a recomputed decoder layer recomputes its cross-attention keys (with their gradient).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache


class PromptPrefixLayer(DynamicLayer):
    """A cache layer holding ``[B, Hkv, p, D]`` prompt keys/values (``p`` may be 0): ``update`` returns the
    prompts in front of the new keys/values and stores nothing; ``get_seq_length`` is ``p``."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        if keys is not None:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.numel() == 0:
            return key_states, value_states
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        return keys, values


class _NeverUpdated(dict):
    """``EncoderDecoderCache.is_updated`` that never records a layer as done (the cross-attention keys are
    recomputed on every call of a layer, as without a cache)."""

    def __setitem__(self, key, value) -> None:
        pass


def prompt_cache(prompts: list[tuple[torch.Tensor, torch.Tensor]], encoder_decoder: bool):
    """A cache of ``prompts`` (per layer ``(key [B, Hkv, p, Dk], value [B, Hkv, p, Dv])``) for one forward:
    a ``DynamicCache`` of :class:`PromptPrefixLayer`, inside an ``EncoderDecoderCache`` whose cross-attention
    part stores nothing where ``encoder_decoder``."""
    cache = DynamicCache()
    cache.layers = [PromptPrefixLayer(k, v) for k, v in prompts]
    cache.layer_class_to_replicate = None
    if not encoder_decoder:
        return cache
    cross = DynamicCache()
    cross.layer_class_to_replicate = PromptPrefixLayer
    wrapped = EncoderDecoderCache(cache, cross)
    wrapped.is_updated = _NeverUpdated()
    return wrapped
