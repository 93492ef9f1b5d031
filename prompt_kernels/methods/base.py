"""PromptMethod: the base class of every prompt method, and the method registry.

A method is an ``nn.Module`` holding the prompt parameters. The :class:`~prompt_kernels.PromptedModel`
calls its hooks during each forward of the attached model; a hook that returns None does nothing, so
a method overrides only the hooks of the injection styles it uses (METHODS.md):

=====================  ==========================================================================
hook                   called / returns
=====================  ==========================================================================
``input_prompts``      once per forward, before the embeddings: ``[B|1, p, d]`` vectors prepended to
                       the input embeddings (input style), or None.
``prefix``             at every layer, when the layer starts: ``PrefixKV`` / ``(key, value, gate)``
                       joined to that layer's self-attention (prefix style), or None.
``sequence_init``      once, when layer ``sequence_layer`` starts: ``[B|1, p, d]`` rows inserted in
                       front of the hidden states (sequence style), or None.
``sequence_update``    after every layer ``l >= sequence_layer``: the rows output by layer ``l``
                       ``[B, p, d]`` -> the rows entering layer ``l + 1``.
``aux_losses``         after the forward: ``{name: scalar}`` added to the returned loss when labels
                       were given, and exposed as ``PromptedModel.last_aux_losses``.
=====================  ==========================================================================

Inside every hook ``ctx`` is the :class:`~prompt_kernels.patch.context.ForwardContext` of the
current forward: ``ctx.attention_mask`` (``[B, T]`` bool, real tokens), ``ctx.input_embeddings``
(``[B, T, d]``), ``ctx.layer_input(l)`` (``X^l``, the hidden states entering layer ``l``, captured by a
forward pre-hook; ``ctx.embedding_output`` = ``X^0`` without prompt rows), ``ctx.project_key_value(l,
P)`` (hidden-space prompts through layer ``l``'s frozen key/value projections), ``ctx.memo(key, fn)``
(compute once per forward), ``ctx.cache`` (free per-forward storage), ``ctx.training``,
``ctx.decoding`` (a cached generation step), ``ctx.depth`` (0 unless nested) and
``ctx.forward_without_prompts(...)``.

During ``PromptedModel.generate`` the input prompts and every layer's prefix are computed on the
first (prefill) forward only and reused for every new token.

Registering a method (its config registered with ``prompt_kernels.configs.register_config``)::

    @register_method(FooConfig)
    class Foo(PromptMethod):
        def __init__(self, config, info):
            super().__init__(config, info)
            self.prompt = nn.Parameter(...)

        def prefix(self, ctx, layer_idx):
            key, value = ctx.project_key_value(layer_idx, self.prompt[None])
            return key, value, None   # gate None = 1
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig

# Methods depend on the patch layer only through the objects it hands to their hooks: ``info`` (a
# ``prompt_kernels.patch.info.ModelInfo``) and ``ctx`` (a ``prompt_kernels.patch.context.ForwardContext``).
# This module imports nothing of the patch layer; the patch layer imports the methods.

_METHODS: dict[type, type] = {}


class PrefixKV(NamedTuple):
    """What ``PromptMethod.prefix`` may return for one layer: key ``[B|1, Hkv, p, Dk]``, value
    ``[B|1, Hkv, p, Dv]`` and a gate broadcastable to ``[B, H]`` (None = a constant 1)."""

    key: torch.Tensor
    value: torch.Tensor
    gate: torch.Tensor | None = None


def register_method(config_cls: type[PromptConfig]):
    """Class decorator: ``attach(model, config)`` builds this method for configs of ``config_cls``."""

    def deco(method_cls):
        if not (isinstance(method_cls, type) and issubclass(method_cls, PromptMethod)):
            raise TypeError(f"{method_cls!r} must subclass PromptMethod")
        _METHODS[config_cls] = method_cls
        method_cls.config_class = config_cls
        return method_cls

    return deco


def method_class(config: PromptConfig) -> type[PromptMethod]:
    """The method class registered for ``type(config)`` (importing ``prompt_kernels.methods.<method>``)."""
    if not isinstance(config, PromptConfig):
        raise TypeError(f"config must be a prompt_kernels PromptConfig, got {type(config).__name__}")
    for cls in type(config).__mro__:
        if cls in _METHODS:
            return _METHODS[cls]
    try:
        importlib.import_module(f"prompt_kernels.methods.{config.method}")
    except ModuleNotFoundError as exc:
        if exc.name != f"prompt_kernels.methods.{config.method}":
            raise
    for cls in type(config).__mro__:
        if cls in _METHODS:
            return _METHODS[cls]
    raise ValueError(f"no prompt method is registered for {type(config).__name__} (method {config.method!r})")


def build_method(config: PromptConfig, info, **options) -> PromptMethod:
    return method_class(config)(config, info, **options)


class PromptMethod(nn.Module):
    """Base class of prompt methods. Subclasses create their parameters in ``__init__`` (float32, on
    ``info.device``; the PromptedModel casts what the hooks return to the model's dtype).

    Class attributes:
        config_class: set by ``register_method``.
        sequence_layer: for sequence style, the layer whose input gets the rows (0 = right after the
            embeddings); None = no sequence style. May also be set per instance in ``__init__``.

    ``__init__(config, info, **options)``: ``options`` are the extra keyword arguments of
    ``attach`` (e.g. ``tokenizer``); ignore the ones you do not use.
    """

    config_class: type[PromptConfig] = PromptConfig
    sequence_layer: int | None = None

    def __init__(self, config: PromptConfig, info, **options):
        super().__init__()
        self.config = config
        # A plain attribute (not a submodule): the base model's parameters must not appear in the
        # method's state_dict / parameters.
        object.__setattr__(self, "info", info)

    # -- hooks (override the ones you need) --------------------------------------------------------
    def input_prompts(self, ctx) -> torch.Tensor | None:
        """Input style: ``[B|1, p, d]`` prompt vectors prepended to the input embeddings, or None.

        The PromptedModel puts ``p`` ones in front of the attention mask, ``p`` zeros in front of
        ``token_type_ids``, ``p`` values -100 in front of token-level labels ``[B, T]``, and passes
        explicit ``position_ids`` so the real tokens keep their positions (the prompt vectors get
        the first position, ``info.positions.first``). Outputs (hidden states, logits)
        cover ``p + T`` positions, prompt first, as in PEFT.
        """
        return None

    def prefix(self, ctx, layer_idx: int):
        """Prefix style: the prompt keys/values of layer ``layer_idx``, or None (layer unprompted).

        Return ``(key, value, gate)`` or a :class:`PrefixKV`: key/value ``[B|1, Hkv, p, Dh]``; gate a
        tensor broadcastable to ``[B, H]`` with values in [0, 1] (multiplies the prompt keys'
        attention weights; 0 = exactly no prompt) or None for a constant 1. Hidden-space prompts
        ``[B|1, p, d]`` become key/value through ``ctx.project_key_value(layer_idx, prompts)``.
        Called when the layer starts, so ``ctx.layer_input(layer_idx)`` (``X^l``) is available.
        """
        return None

    def sequence_init(self, ctx) -> torch.Tensor | None:
        """Sequence style: ``[B|1, p, d]`` rows inserted in front of the hidden states entering layer
        ``self.sequence_layer`` (``ctx.layer_input(sequence_layer)`` is available). The attention mask
        of that layer and the following ones is extended (every token sees the rows; the rows see
        each other and, in encoders, the real tokens; in causal models only the rows before them);
        rotary models give the rows no rotation. The rows are removed after the last layer, before
        the model's head."""
        return None

    def sequence_update(self, ctx, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """Sequence style: ``rows`` ``[B, p, d]`` are the prompt rows output by layer ``layer_idx``; return
        the rows that enter layer ``layer_idx + 1`` (same shape). Called for every layer from
        ``sequence_layer`` on, the last one included (its return value becomes ``ctx.sequence_rows``)."""
        return rows

    def aux_losses(self, ctx, output) -> dict[str, torch.Tensor]:
        """Extra training losses ``{name: scalar tensor}`` after the forward (``output`` = the model's
        output, also ``ctx.output``). Added to ``output.loss`` when labels were given; always exposed
        as ``PromptedModel.last_aux_losses``. A method that runs nested forwards from here should
        return ``{}`` when ``ctx.depth > 0``."""
        return {}

    def model_hooks(self) -> list:
        """Hooks the method keeps on the base model while attached: register them here and return their
        handles (``PromptedModel.detach`` removes them). Called once, when the method is attached.
        Registering at attach time, not during a forward, keeps a forward traceable by torch.compile."""
        return []

    # -- parameters -------------------------------------------------------------------------------
    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable prompt parameters (default: every parameter of the method)."""
        return (p for p in self.parameters() if p.requires_grad)


__all__ = ["PrefixKV", "PromptMethod", "build_method", "method_class", "register_method"]
