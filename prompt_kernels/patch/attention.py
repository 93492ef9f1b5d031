"""The ``prompt_kernels`` attention implementation registered in transformers' attention interface.

``attach`` gives the model a private copy of its config, sets its ``_attn_implementation`` to
``"prompt_kernels"`` (through ``model.set_attn_implementation``) and records an
:class:`AttentionBinding` on each attention module: the implementation the model used before
(``eager`` or ``sdpa``) and the prompt slots (sites) the module serves. Per forward, the
PromptedModel's layer pre-hooks pass ``{site: LayerPrompt}`` in the keyword argument ``PREFIX_KWARG``
(transformers forwards a layer's ``**kwargs`` to its attention call), so no state lives in this
module: two prompted models never see each other's prompts and the prompts survive
gradient-checkpoint recomputation (the layer's keyword arguments are replayed).

Routes: the fused op (``ops.gated_prefix_attention``) where it computes exactly what the model
would; otherwise the concatenation route, which puts the prompt keys/values in front of the layer's
own and calls the model's own implementation (attention dropout in training, ``softcap``, attention
sinks, T5's ``position_bias`` (zero on the prompt columns), different key and value head sizes).

Masks: the mask interface entry ``prompt_kernels`` is transformers' ``sdpa_mask`` (a 4D bool mask,
or None where SDPA would use ``is_causal`` / no mask). Layers without prompts call the wrapped
implementation with exactly that mask (converted to eager's additive float mask when the wrapped
implementation is eager). Prompted layers call ``ops.gated_prefix_attention``: a bidirectional
padding mask becomes its bool ``[B, S]`` key-padding mask, any other mask its additive form.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prompt_kernels.ops.gated_prefix_attention import cpu_inference, gated_prefix_attention
from prompt_kernels.patch import discovery

IMPLEMENTATION = "prompt_kernels"
PREFIX_KWARG = "prompt_kernels_prefix"
WRAPPABLE = ("eager", "sdpa")
# Keyword arguments the fused op does not model: a non-None value takes the concatenation route.
CONCAT_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


@dataclass(frozen=True)
class LayerPrompt:
    """One site's prompt keys/values and gate, as handed to the attention.

    key: ``[B or 1, Hkv, P, Dk]``, value: ``[B or 1, Hkv, P, Dv]`` in the attention's dtype; gate:
    broadcastable to ``[B, H]``.
    """

    key: torch.Tensor
    value: torch.Tensor
    gate: torch.Tensor
    gate_is_one: bool = False  # the gate is a constant 1 (no log(gate) bias needed)
    attention_dropout: str = "model"  # PromptConfig.attention_dropout
    route: str = "auto"  # "auto" (fused op where exact) | "concat" (always the concatenation route)


@dataclass(frozen=True)
class HostPrompts:
    """What a host layer's keyword argument ``PREFIX_KWARG`` carries: its sites' prompts, the layer's
    attention mask as the layer received it with its ``convert_mask`` form (computed once per forward
    per mask object by the PromptedModel), and whether the call is eager CPU inference on the ``auto``
    backend (the op's CPU path is then called directly: the patch layer built valid inputs)."""

    prompts: dict
    mask_in: torch.Tensor | None = None
    mask_op: torch.Tensor | None = None
    mask_causal: bool = False
    direct_cpu: bool = False
    # The forward's self-attention key/value cache (a ``Cache``) or None; ``inject``: this is a forward of
    # ``PromptedModel.generate``, whose prefill puts each layer's prompts into that cache (see below).
    kv_cache: object = None
    inject: bool = False


@dataclass(frozen=True)
class CachedPrompts:
    """What a host layer's ``PREFIX_KWARG`` carries on a decoding step of ``PromptedModel.generate``
    once the prefill has put its sites' gate-1 prompts into their :class:`PromptedCacheLayer`:
    ``rows`` maps each site to its prompt rows there. The attention then pads the mask and makes one
    plain call, with nothing else to look up."""

    rows: dict


_GATE_ONE = LayerPrompt(torch.empty(0), torch.empty(0), torch.ones(1), gate_is_one=True)


@dataclass
class AttentionBinding:
    """What ``attach`` records on an attention module (removed by ``detach``)."""

    inner: str  # "eager" | "sdpa": the implementation the model used before attach
    eager_fn: Callable  # the model file's own eager_attention_forward
    sites: frozenset[int]  # the prompt slots this module serves (empty: e.g. cross-attention)

    def call_inner(self, module, query, key, value, attention_mask, **kwargs):
        if self.inner == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
        mask = _eager_mask(attention_mask, query, key, _is_causal(module, kwargs))
        kwargs.pop("is_causal", None)
        return self.eager_fn(module, query, key, value, mask, **kwargs)


BINDING_ATTR = "_prompt_kernels_binding"


class PromptedCacheLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values hold ``prompt_rows`` prompt rows in front of the tokens'.

    During ``PromptedModel.generate`` the prefill moves every layer's prompt keys/values into
    the front of that layer's cache (once), so each decoding step is one call of the wrapped attention
    over ``[prompts; cache]`` (the plain model's cost) instead of a prompt segment, a cache segment and a
    merge. The lengths the model reads (``get_seq_length``, hence ``get_mask_sizes``, cache positions and
    position ids) count the tokens only, so positions, masks and sliding windows are those of the tokens;
    the attention pads the model's mask with the prompt columns. Only plain ``DynamicLayer`` objects are
    turned into this class (their instance class is swapped; ``reset`` swaps it back).
    """

    prompt_rows = 0

    def get_seq_length(self) -> int:
        n = super().get_seq_length()
        return n - self.prompt_rows if n else 0

    def reset(self) -> None:
        super().reset()
        self.prompt_rows = 0
        self.__class__ = DynamicLayer


def cache_layer_of(cache, module):
    """The cache layer of ``module`` (by its ``layer_idx``) in a ``Cache``, or None."""
    idx = getattr(module, "layer_idx", None)
    layers = getattr(cache, "layers", None)
    if not isinstance(idx, int) or layers is None or not 0 <= idx < len(layers):
        return None
    return layers[idx]


def _put_prompts_in_cache(layer, prefix: LayerPrompt, B: int) -> bool:
    """Prefill: put the prompt keys/values in front of ``layer``'s (a plain ``DynamicLayer`` whose whole
    content this call's keys/values are: the right layer, not another layer's shared cache, not values the
    model transformed after the update). Returns True."""
    pk = prefix.key.to(layer.keys.dtype).expand(B, -1, -1, -1)
    pv = prefix.value.to(layer.values.dtype).expand(B, -1, -1, -1)
    layer.keys = torch.cat([pk, layer.keys], dim=2)
    layer.values = torch.cat([pv, layer.values], dim=2)
    layer.__class__ = PromptedCacheLayer
    layer.prompt_rows = prefix.key.shape[2]
    return True


def model_eager_function(attn_module) -> Callable:
    """The modeling file's ``eager_attention_forward`` (what ``get_interface("eager", ...)`` falls back
    to), else a plain one (no softcap or sinks: those models' files define their own)."""
    for cls in type(attn_module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    return _plain_eager


def _plain_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


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
    equality check (one pass over the mask) and only takes the shortcut when ``T == 1``; so does tracing
    by torch.compile.
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
    # Under torch.compile the equality check would be a data-dependent branch (a graph break per layer).
    exact = exact and not torch.compiler.is_compiling()
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


def _concat_path(
    binding, module, query, key, value, mask, prefix: LayerPrompt, scaling, dropout, kwargs, joined: int = 0
):
    """Prompt keys/values concatenated in front, through the wrapped implementation (keeps its dropout,
    softcap, sinks; a ``position_bias`` gets zero columns for the prompts).

    The mask over ``P + S`` keys stays None (no mask: SDPA's fastest kernels) or bool where it can:
    an additive mask is built only for a gate other than 1 (``log(gate)`` on the prompt columns).
    ``joined``: the key/value already hold that many prompt rows in front (a :class:`PromptedCacheLayer`).
    """
    B, H, T, _ = query.shape
    P = joined or prefix.key.shape[2]
    S = key.shape[2] - joined
    if joined and mask is not None and mask.dim() == 4 and mask.shape[-1] != S:
        raise ValueError(
            f"prompt_kernels: {type(module).__name__}'s attention mask covers {mask.shape[-1]} keys, "
            f"expected {S} (the tokens' keys)"
        )
    if mask is not None and mask.dim() != 4:
        raise NotImplementedError(
            f"prompt_kernels: {type(module).__name__} passes a {mask.dim()}D attention mask; prompted "
            "attention needs the 4D masks transformers builds"
        )
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
    if joined:
        k, v = key, value
    else:
        k = torch.cat([prefix.key.expand(B, -1, -1, -1), key], dim=2)
        v = torch.cat([prefix.value.expand(B, -1, -1, -1), value], dim=2)
    kwargs = {**kwargs, "is_causal": False}
    bias = kwargs.get("position_bias")
    if bias is not None:
        zeros = bias.new_zeros(*bias.shape[:-1], P)
        kwargs["position_bias"] = torch.cat([zeros, bias], dim=-1)
    return binding.call_inner(module, query, k, v, full, scaling=scaling, dropout=dropout, **kwargs)


def prompt_kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered implementation. query ``[B, H, T, Dh]``, key/value ``[B, Hkv, S, Dh]``;
    returns ``(out [B, T, H, Dh], None or weights)`` like every transformers attention function."""
    host = kwargs.pop(PREFIX_KWARG, None)
    binding: AttentionBinding | None = getattr(module, BINDING_ATTR, None)
    if type(host) is CachedPrompts and binding is not None:
        P = next((host.rows[i] for i in binding.sites if i in host.rows), 0)
        if not P:
            return binding.call_inner(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if attention_mask is None and query.shape[2] == 1 and kwargs.get("position_bias") is None:
            kwargs["is_causal"] = False  # one query row: every key (prompts included) is visible
            return binding.call_inner(
                module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs
            )
        return _concat_path(
            binding, module, query, key, value, attention_mask, _GATE_ONE, scaling, dropout, kwargs, P
        )
    if binding is None:
        rec = discovery.recording()
        if rec is None:
            raise RuntimeError(
                f"{type(module).__name__} runs the 'prompt_kernels' attention implementation but was not set up "
                "by prompt_kernels.attach"
            )
        discovery.record_call(rec, module, query, key, value, {**kwargs, rec.kwarg: host, "scaling": scaling})
        binding = AttentionBinding(rec.inner, model_eager_function(module), frozenset())
        host = None
    prefix = None
    if host is not None:
        prefix = next((host.prompts[i] for i in binding.sites if i in host.prompts), None)
    if prefix is None:
        return binding.call_inner(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # Decoding after a prefill that put this layer's prompts into its cache (``cached``), or such a prefill
    # (``fresh``: this call's keys/values are exactly the layer's), checked on the tensors as they came.
    layer = None if host.kv_cache is None else cache_layer_of(host.kv_cache, module)
    cached = isinstance(layer, PromptedCacheLayer) and layer.keys is key
    fresh = (
        host.inject
        and not cached
        and type(layer) is DynamicLayer
        and layer.keys is key
        and layer.values is value
    )
    # The attention's compute dtype: autocast's (what SDPA would run in), else the query's. Prompts (and,
    # under autocast, query/key/value, which rotary embeddings may have promoted) are cast where they are
    # used; gradients flow back to the prompts in their own dtype.
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if not (query.dtype == key.dtype == value.dtype == dtype):
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if prefix.key.dtype != dtype or prefix.value.dtype != dtype:
        prefix = dataclasses.replace(prefix, key=prefix.key.to(dtype), value=prefix.value.to(dtype))
    # A prefill moves the prompts into the cache, except where the model derives a bias from the keys'
    # length (T5's position_bias counts cached rows). Either way one call over [prompts; tokens].
    joined = cached or (
        fresh
        and kwargs.get("position_bias") is None
        and not torch.compiler.is_compiling()
        and _put_prompts_in_cache(layer, prefix, query.shape[0])
    )
    if joined:
        return _concat_path(
            binding,
            module,
            query,
            layer.keys.to(dtype),
            layer.values.to(dtype),
            attention_mask,
            prefix,
            scaling,
            dropout,
            kwargs,
            layer.prompt_rows,
        )
    return _prompted(
        binding, module, query, key, value, attention_mask, prefix, scaling, dropout, kwargs, host
    )


def _prompted(binding, module, query, key, value, attention_mask, prefix, scaling, dropout, kwargs, host):
    """Prompted attention over ``[prompts; key]``: the fused op where it is exact, else concatenation."""
    if (
        prefix.route == "concat"
        or (dropout and prefix.attention_dropout == "model")
        or any(kwargs.get(name) is not None for name in CONCAT_KWARGS)
        or key.shape[-1] != value.shape[-1]
        or query.shape[-1] != key.shape[-1]
    ):
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
    elif attention_mask is host.mask_in:
        op_mask, op_causal = host.mask_op, host.mask_causal
    else:
        op_mask, op_causal = convert_mask(attention_mask, B, causal, exact=False)
    if op_mask is not None and op_mask.dim() == 4 and op_mask.shape[2] == 1 < T:
        op_mask = op_mask.expand(-1, -1, T, -1)  # a broadcast [B, 1, 1, S] additive padding mask
    operands = (query, key, value, prefix.key, prefix.value, prefix.gate, op_mask)
    if host.direct_cpu and not torch.is_grad_enabled():
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        out = cpu_inference(*operands, op_causal, scale)
    else:
        out = gated_prefix_attention(*operands, is_causal=op_causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the implementation and its mask function (idempotent; the supported transformers API)."""
    AttentionInterface.register(IMPLEMENTATION, prompt_kernels_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


register()
