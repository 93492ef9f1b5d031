"""The ``prompt_kernels`` attention implementation registered in transformers' attention interface.

``attach`` sets ``config._attn_implementation = "prompt_kernels"`` (through
``model.set_attn_implementation``) and records an :class:`AttentionBinding` on each attention module:
the implementation the model used before (``eager`` or ``sdpa``) and, for self-attention modules, the
layer index. Per forward, the PromptedModel's layer pre-hooks pass the layer's prompt keys/values in
the keyword argument ``PREFIX_KWARG`` (transformers forwards a layer's ``**kwargs`` to its attention
call), so no state lives in this module: two prompted models never see each other's prompts and the
prompts survive gradient-checkpoint recomputation (the layer's keyword arguments are replayed).

Masks: the mask interface entry ``prompt_kernels`` is transformers' ``sdpa_mask`` (a 4D bool mask,
or None where SDPA would use ``is_causal`` / no mask). Layers without prompts call the wrapped
implementation with exactly that mask (converted to eager's additive float mask when the wrapped
implementation is eager). Prompted layers call ``ops.gated_prefix_attention``: a bidirectional
padding mask becomes its bool ``[B, S]`` key-padding mask, any other mask its additive form.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prompt_kernels.ops.gated_prefix_attention import gated_prefix_attention

IMPLEMENTATION = "prompt_kernels"
PREFIX_KWARG = "prompt_kernels_prefix"
WRAPPABLE = ("eager", "sdpa")
# Keyword arguments a prompted layer cannot honour with the fused op (a non-None value raises).
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")


@dataclass(frozen=True)
class PrefixKV:
    """One layer's prompt keys/values and gate, as handed to the attention.

    key, value: ``[B or 1, Hkv, P, Dh]`` in the attention's dtype; gate: broadcastable to ``[B, H]``.
    """

    key: torch.Tensor
    value: torch.Tensor
    gate: torch.Tensor
    gate_is_one: bool = False  # the gate is a constant 1 (no log(gate) bias needed)
    attention_dropout: str = "model"  # PromptConfig.attention_dropout
    # The layer's attention mask as the layer received it, and its convert_mask() form (computed once
    # per forward by the PromptedModel, shared by all layers that receive the same mask object).
    mask_in: torch.Tensor | None = None
    mask_op: torch.Tensor | None = None
    mask_causal: bool = False


@dataclass
class AttentionBinding:
    """What ``attach`` records on an attention module (removed by ``detach``)."""

    inner: str  # "eager" | "sdpa": the implementation the model used before attach
    eager_fn: Callable  # the model file's own eager_attention_forward
    layer_idx: int | None  # None: not a prompted self-attention (e.g. cross-attention)

    def call_inner(self, module, query, key, value, attention_mask, **kwargs):
        if self.inner == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
        mask = _eager_mask(attention_mask, query, key, _is_causal(module, kwargs))
        kwargs.pop("is_causal", None)
        return self.eager_fn(module, query, key, value, mask, **kwargs)


BINDING_ATTR = "_prompt_kernels_binding"


def model_eager_function(attn_module) -> Callable:
    fn = getattr(sys.modules.get(type(attn_module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"{type(attn_module).__name__}: its modeling file has no eager_attention_forward to wrap"
        )
    return fn


def _is_causal(module, kwargs) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if flag is None else flag)


def _causal_bool(T: int, S: int, device) -> torch.Tensor:
    """Bottom-right aligned causal pattern ``[T, S]`` (True = attend)."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return s <= t + (S - T)


def _eager_mask(mask, query, key, causal: bool):
    """The additive mask transformers' eager_mask would have built, from the sdpa-style mask."""
    if mask is None:
        T, S = query.shape[2], key.shape[2]
        if not causal or T == 1:
            return None
        mask = _causal_bool(T, S, query.device)[None, None]
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(query.dtype).min)
    return mask


def convert_mask(mask: torch.Tensor, B: int, causal: bool, exact: bool = True):
    """A 4D sdpa-style mask ``[B|1, 1|H, T, S]`` -> ``(mask, is_causal)`` for ops.gated_prefix_attention.

    A bool mask that is a key-padding pattern (bidirectional), or causal AND key padding (causal),
    becomes the op's bool ``[B, S]`` mask (with ``is_causal`` in the second case); anything else
    (sliding windows, custom masks) becomes an additive float mask. ``exact=False`` skips the
    equality check (one pass over the mask) and only takes the shortcut when ``T == 1``.
    """
    if mask.dim() != 4:
        raise ValueError(
            f"prompt_kernels attention expects a 4D attention mask, got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] != B:
        mask = mask.expand(B, *mask.shape[1:])
    T, S = mask.shape[2], mask.shape[3]
    if mask.dtype != torch.bool:
        return mask, False
    if mask.shape[1] == 1:
        if T == 1:
            return mask[:, 0, 0, :], False
        if exact:
            if not causal:
                row = mask[:, 0, 0, :]
                if bool((mask[:, 0] == row[:, None, :]).all()):
                    return row, False
            else:
                row = mask[:, 0, -1, :]
                pattern = _causal_bool(T, S, mask.device)[None] & row[:, None, :]
                if bool((mask[:, 0] == pattern).all()):
                    return row, True
    additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)
    return additive, False


def _concat_path(binding, module, query, key, value, mask, prefix: PrefixKV, scaling, dropout, kwargs):
    """Prompt keys/values concatenated in front, through the wrapped implementation (keeps its dropout).

    The mask over ``P + S`` keys stays None (no mask: SDPA's fastest kernels) or bool where it can:
    an additive mask is built only for a gate other than 1 (``log(gate)`` on the prompt columns).
    """
    B, H, T, _ = query.shape
    S = key.shape[2]
    P = prefix.key.shape[2]
    causal = _is_causal(module, kwargs) and T > 1
    real = mask if mask is not None else (_causal_bool(T, S, query.device)[None, None] if causal else None)
    if prefix.gate_is_one and real is None:
        full = None
    elif prefix.gate_is_one and real.dtype == torch.bool:
        b, h = real.shape[0], real.shape[1]
        ones = torch.ones(b, h, T, P, dtype=torch.bool, device=real.device)
        full = torch.cat([ones, real.expand(b, h, T, S)], dim=-1)
    else:
        if real is None:
            real_add = torch.zeros(1, 1, T, S, dtype=query.dtype, device=query.device)
        elif real.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            real_add = torch.where(real, zero, torch.finfo(query.dtype).min)
        else:
            real_add = real.to(query.dtype)
        if prefix.gate_is_one:
            prompt_add = torch.zeros(1, 1, T, P, dtype=query.dtype, device=query.device)
        else:
            g = prefix.gate.to(query.dtype).expand(B, H)
            prompt_add = torch.log(g)[:, :, None, None].expand(B, H, T, P)
        heads = max(real_add.shape[1], prompt_add.shape[1])
        batch = max(real_add.shape[0], prompt_add.shape[0])
        full = torch.cat([prompt_add.expand(batch, heads, T, P), real_add.expand(batch, heads, T, S)], dim=-1)
    k = torch.cat([prefix.key.expand(B, -1, -1, -1), key], dim=2)
    v = torch.cat([prefix.value.expand(B, -1, -1, -1), value], dim=2)
    kwargs = {**kwargs, "is_causal": False}
    return binding.call_inner(module, query, k, v, full, scaling=scaling, dropout=dropout, **kwargs)


def prompt_kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered implementation. query ``[B, H, T, Dh]``, key/value ``[B, Hkv, S, Dh]``;
    returns ``(out [B, T, H, Dh], None or weights)`` like every transformers attention function."""
    prefix = kwargs.pop(PREFIX_KWARG, None)
    binding: AttentionBinding | None = getattr(module, BINDING_ATTR, None)
    if binding is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the 'prompt_kernels' attention implementation but was not set up by "
            "prompt_kernels.attach (was the config shared with another model?)"
        )
    if prefix is None or binding.layer_idx is None:
        return binding.call_inner(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"prompt_kernels: prompted attention does not support `{name}`")
    if dropout and prefix.attention_dropout == "model":
        return _concat_path(
            binding, module, query, key, value, attention_mask, prefix, scaling, dropout, kwargs
        )
    B, _, T, _ = query.shape
    S = key.shape[2]
    causal = _is_causal(module, kwargs)
    if attention_mask is None:
        op_mask, op_causal = None, causal and T > 1
        if op_causal and S > T:
            # Prefill into an empty static cache (sdpa_mask skipped the mask): only the first T keys are real.
            key, value = key[:, :, :T], value[:, :, :T]
    elif attention_mask is prefix.mask_in:
        op_mask, op_causal = prefix.mask_op, prefix.mask_causal
    else:
        op_mask, op_causal = convert_mask(attention_mask, B, causal, exact=False)
    out = gated_prefix_attention(
        query, key, value, prefix.key, prefix.value, prefix.gate, op_mask, is_causal=op_causal, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the implementation and its mask function (idempotent; the supported transformers API)."""
    AttentionInterface.register(IMPLEMENTATION, prompt_kernels_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


register()
