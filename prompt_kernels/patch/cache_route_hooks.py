"""The cache route's part of ``PromptedModel`` (models whose own attention code reads a key/value cache
but does not go through transformers' attention interface): the prompts become a pre-filled cache, the
attention mask gets their columns in front, and the tokens keep their own positions.

A mixin of ``PromptedModel``: it reads the attached model's ``info`` (layout, positions), ``model``,
``_generation``, ``_accepts``, ``_checkpoint_layers``, ``_signatures``, ``_current()`` and
``_layer_prefix()``, all set up by ``PromptedModel``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from prompt_kernels.patch.context import CACHE_KWARGS, ForwardContext, cache_argument
from prompt_kernels.patch.model_state import set_flags
from prompt_kernels.patch.prompt_cache import prompt_cache


class CacheRouteHooks:
    def _apply_cache_prompts(self, ctx: ForwardContext, kwargs: dict) -> dict:
        """The cache route (models without the attention interface): every layer's prompt keys/values
        become a pre-filled ``DynamicCache`` the model's own attention reads, the 2D attention mask gets
        ``p`` ones in front, and the tokens keep the positions they have without prompts."""
        from transformers import DynamicCache

        past = cache_argument(kwargs)
        gen = self._generation if ctx.depth == 0 else None
        growing = None  # generate's own cache, which takes the prompts at the prefill and keeps them
        n = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        if past is not None:
            if gen is not None and gen.cache_grows and type(past) is DynamicCache:
                growing = past
            elif n == 0 and kwargs.get("use_cache") is False:
                # generate(use_cache=False) still hands an empty cache to every step: ours takes its place.
                kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
            else:
                raise NotImplementedError(
                    f"{type(self.model).__name__} does not use transformers' attention interface; its prompts "
                    "travel in the key/value cache, so a forward with a cache of its own (decoding) is not supported"
                )
        prompts = [self._layer_prefix(ctx, i) for i in range(self.info.num_layers)]
        if all(p is None for p in prompts):
            return kwargs
        if any(p is None or not p.gate_is_one for p in prompts):
            raise NotImplementedError(
                f"{type(self.model).__name__} does not use transformers' attention interface: prompts reach it only "
                "as a key/value cache, which needs ungated prompts at every layer (prefix tuning, prompt tuning)"
            )
        B = ctx.batch_size
        P = prompts[0].key.shape[2]
        rows = [(p.key.expand(B, -1, -1, -1), p.value.expand(B, -1, -1, -1)) for p in prompts]
        if growing is not None:
            if gen.cache_rows == 0:  # the prefill: the prompts go into the front of generate's cache
                if n:
                    raise NotImplementedError(
                        "generate() on the cache route needs an empty cache to start from"
                    )
                for i, (key, value) in enumerate(rows):
                    growing.update(key, value, i)
                gen.cache_rows = P
            else:
                ctx.tokens_past = n - gen.cache_rows
        else:
            cache = prompt_cache(rows, self.info.layout.cache_wrap == "encoder_decoder")
            if self._checkpoint_layers and self.model.training and torch.is_grad_enabled():
                ctx.checkpoint_flags = set_flags(self._checkpoint_layers, "_can_checkpoint_with_cache", True)
            if self.info.layout.cache_module is None:
                kwargs[self.info.layout.cache_kwarg] = cache
            else:
                ctx.prompt_cache = cache  # handed to layout.cache_module by _on_cache_module_start
        # The prompts sit in the (decoder's) self-attention: its 2D mask gets them in front.
        mask_name = "decoder_attention_mask" if self.info.encoder_decoder else "attention_mask"
        mask = kwargs.get(mask_name)
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"prompts on the cache route need a 2D {mask_name} [B, T] (or none)")
            kwargs[mask_name] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        ctx.prompt_cache_length = P
        if self.info.encoder_decoder:
            return kwargs
        # The tokens keep the positions they have without prompts: given where the forward takes them (and
        # counted from 0 by the embeddings that read the cache length, _on_position_module_start).
        if "position_ids" in self._accepts and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self._token_positions(ctx, kwargs)
        return kwargs

    def _token_positions(self, ctx: ForwardContext, kwargs: dict) -> torch.Tensor:
        """``[B, T]``: the positions the model gives its tokens behind ``ctx.tokens_past`` cached tokens
        and no prompts (RoBERTa's too)."""
        ids = kwargs.get("input_ids")
        T = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        return self.info.positions.default_ids(ids, T, ctx.tokens_past, ctx.device).expand(ctx.batch_size, -1)

    # -- hooks: the module a cache must be handed to (a head that does not pass one on) -----------------
    def _on_cache_module_start(self, module, args, kwargs):
        """Hands the forward's cache of prompts to ``layout.cache_module`` (the base model, or the encoder
        below it), once: a head calling it again within one forward gets no prompts there; with the
        tokens' own positions."""
        ctx = self._current()
        cache = getattr(ctx, "prompt_cache", None)
        if cache is None:
            return None
        ctx.prompt_cache = None
        kw = self.info.layout.cache_kwarg
        positional = self._positional_names(module, len(args))
        if kwargs.get(kw) is not None or kw in positional:
            raise NotImplementedError(
                f"{type(module).__name__} was called with a key/value cache of its own; its prompts travel in "
                "that argument, so this is not supported"
            )
        kwargs = {**kwargs, kw: cache}
        if (
            not self.info.encoder_decoder
            and "position_ids" in self._param_names(module)
            and "position_ids" not in positional
            and kwargs.get("position_ids") is None
            and (kwargs.get("input_ids") is not None or kwargs.get("inputs_embeds") is not None)
        ):
            kwargs["position_ids"] = self._token_positions(ctx, kwargs)
        return args, kwargs

    def _on_position_module_start(self, module, args, kwargs):
        """The cache route: an embedding module counts the tokens' positions from the tokens already in
        the cache (``ctx.tokens_past``, 0 outside decoding), not from the prompt rows in front of them."""
        ctx = self._current()
        if not getattr(ctx, "prompt_cache_length", 0):
            return None
        past = ctx.tokens_past
        if "cache_length" in self._positional_names(module, len(args)):
            names = self._param_names(module)
            return tuple(past if n == "cache_length" else a for n, a in zip(names, args)), kwargs
        return args, {**kwargs, "cache_length": past}

    def _param_names(self, module: nn.Module) -> tuple[str, ...]:
        """``module.forward``'s parameter names, read once per module (hooks run on every forward)."""
        names = self._signatures.get(id(module))
        if names is None:
            names = tuple(inspect.signature(module.forward).parameters)
            self._signatures[id(module)] = names
        return names

    def _positional_names(self, module: nn.Module, n: int) -> set[str]:
        """The parameter names ``n`` positional arguments of a call of ``module`` fill."""
        return set(self._param_names(module)[:n])
