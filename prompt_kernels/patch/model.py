"""PromptedModel: a transformers model with a prompt method attached through hooks.

``attach(model, config)`` leaves the model's classes, its ``forward`` and every module global alone:

- the model gets a private copy of its config (the caller's config object is never changed), whose
  attention implementation becomes ``"prompt_kernels"`` (``model.set_attn_implementation``); it
  wraps the previous one (see ``patch/attention.py``);
- ``discovery.discover`` runs one probe forward and finds the self-attention sites, their layers
  (hosts) and dimensions; each attention module gets an ``AttentionBinding`` attribute;
- the base model's parameters are frozen (flags remembered);
- hooks: a forward pre-hook and a forward hook on the model (per-call context, input style, aux
  losses), on an encoder-decoder's encoder too (``generate`` runs it by itself), a forward hook on
  the input embedding module (input-style vectors), a forward pre-hook on every host layer (records
  ``X^l``, inserts sequence rows, extends masks, hands the layer's prompt keys/values to its attention
  as a keyword argument) and a forward hook on the layers of sequence style (rewrites / strips the
  rows).

The cache route's hooks (models whose own attention code reads a key/value cache) are in
``patch/cache_route_hooks.py``, a mixin of PromptedModel; what attach changes on the model and restores
in ``patch/model_state.py``; the checks input-style prompts need in ``patch/input_checks.py``.

The per-forward data path reads top to bottom: model pre-hook (context, input style) -> host
pre-hook (prompts of the host's sites) -> ``prompt_kernels_attention`` -> ``ops.gated_prefix_attention``
(or the concatenation route). ``detach()`` undoes all of it. Per-forward state lives in a stack of
ForwardContexts on the PromptedModel. Because transformers (>= 5) checkpoints a layer's ``forward``
(not ``__call__``), the host hooks run once per forward even with gradient checkpointing, and the
recomputation replays the layer's keyword arguments, prompts included.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections.abc import Iterator

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig
from prompt_kernels.methods.base import PrefixKV, PromptMethod, build_method
from prompt_kernels.patch import io
from prompt_kernels.patch import sequence as seq
from prompt_kernels.patch.attention import (
    BINDING_ATTR,
    IMPLEMENTATION,
    PREFIX_KWARG,
    WRAPPABLE,
    AttentionBinding,
    CachedPrompts,
    HostPrompts,
    LayerPrompt,
    PromptedCacheLayer,
    cache_layer_of,
    model_eager_function,
)
from prompt_kernels.patch.cache_prompts import cache_route_grows_exactly, cache_route_is_exact
from prompt_kernels.patch.cache_route_hooks import CacheRouteHooks
from prompt_kernels.patch.context import CACHE_KWARGS, ForwardContext
from prompt_kernels.patch.discovery import Layout, NoAttentionInterface, discover, discover_cache
from prompt_kernels.patch.info import ModelInfo
from prompt_kernels.patch.input_checks import (
    embeddings_seq_first,
    refuse_layer_prompts,
    refuse_other_per_token_inputs,
)
from prompt_kernels.patch.model_state import (
    checkpointing_layers,
    isolate_configs,
    param_index,
    restore_configs,
    restore_flags,
)

ROUTES = ("auto", "concat")


class NotOffered(AttributeError, NotImplementedError):
    """A PEFT call prompt_kernels does not offer: NotImplementedError for a caller, AttributeError for
    ``hasattr`` / ``getattr(obj, name, default)`` probes (the attribute does not exist here)."""


# PEFT calls a PEFT user may make that have no meaning here: they raise instead of falling through to
# the base model (where some exist under the same name and would silently act on the base model alone).
PEFT_ONLY = {
    "merge_and_unload": "prompts are extra keys/values and vectors, not weight deltas; use detach()",
    "merge_adapter": "prompts cannot be merged into the base model's weights",
    "unmerge_adapter": "prompts are never merged",
    "unload": "use detach() to get the base model back",
    "set_adapter": "one prompt method per PromptedModel; attach another to a fresh copy",
    "add_adapter": "one prompt method per PromptedModel; attach another to a fresh copy",
    "delete_adapter": "use detach()",
    "disable_adapter": "use the PromptedModel.disabled() context manager",
    "enable_adapters": "prompts are on unless inside PromptedModel.disabled()",
    "disable_adapters": "use the PromptedModel.disabled() context manager",
    "load_adapter": "use prompt_kernels.load_prompts / PromptedModel.from_pretrained",
    "active_adapter": "one prompt method per PromptedModel",
    "active_adapters": "one prompt method per PromptedModel",
    "get_base_model": "use detach() (or .model while attached)",
}


_PROMPTED_CLASSES: dict[type, type] = {}


def _prompted_class(model_class: type, params: list[inspect.Parameter]) -> type:
    """``Prompted<ModelClass>``: a PromptedModel subclass whose ``forward`` has ``model_class.forward``'s
    signature (one per model class)."""
    cls = _PROMPTED_CLASSES.get(model_class)
    if cls is None:

        def forward(self, *args, **kwargs):
            return self._call_model(*args, **kwargs)

        first = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = inspect.Signature([first, *params])
        forward.__doc__ = PromptedModel._call_model.__doc__
        name = f"Prompted{model_class.__name__}"
        cls = type(name, (PromptedModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        _PROMPTED_CLASSES[model_class] = cls
    return cls


class _Generation:
    """Prompts computed on the first forward of a ``generate`` call, reused for every new token."""

    def __init__(self):
        self.prefix: dict[int, LayerPrompt | None] = {}
        # host -> CachedPrompts (or None) for the decoding steps, once the prefill put the prompts in the cache
        self.cached: dict[int, CachedPrompts | None] = {}
        self.inject = False  # the prefill puts the prompts into the key/value cache
        # The cache route: generate's own cache keeps the prompts in front (cache_rows of them, put there
        # by the prefill) and grows with the tokens; False: every step is recomputed without a cache.
        self.cache_grows = False
        self.cache_rows = 0


class PromptedModel(CacheRouteHooks, nn.Module):
    """A transformers model with a prompt method attached. Build it with :func:`attach`.

    ``forward(**kwargs)`` takes the model's own arguments and returns its own output type (plus the
    method's auxiliary losses in ``loss`` when labels are given). Attribute lookups the
    PromptedModel does not know go to the model (``config``, ``generation_config``, ...).
    """

    def __init__(self, model: nn.Module, config: PromptConfig, *, attention_route: str = "auto", **options):
        super().__init__()
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"attach needs a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(config, PromptConfig):
            raise TypeError(f"config must be a prompt_kernels PromptConfig, got {type(config).__name__}")
        if attention_route not in ROUTES:
            raise ValueError(f"attention_route must be one of {ROUTES}, got {attention_route!r}")
        if any(hasattr(m, BINDING_ATTR) for m in model.modules()):
            raise ValueError("this model already has prompts attached; detach() them first")
        inner = model.config._attn_implementation
        if inner not in WRAPPABLE:
            raise ValueError(
                f"prompt_kernels wraps the 'eager' or 'sdpa' attention implementation; this model uses {inner!r}. "
                "Call model.set_attn_implementation('sdpa') first."
            )
        self._previous_attn = inner
        self._route = attention_route
        self._handles: list = []
        self._bound: list[nn.Module] = []
        self._configs = isolate_configs(model)
        try:
            model.set_attn_implementation(IMPLEMENTATION)
            if model.config._attn_implementation != IMPLEMENTATION:
                raise NoAttentionInterface(
                    f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}) does not "
                    "support transformers' attention interface (it keeps attn_implementation="
                    f"{model.config._attn_implementation!r}): its modeling file computes attention itself"
                )
            layout = discover(model, PREFIX_KWARG, inner)
        except NoAttentionInterface as exc:
            restore_configs(self._configs)
            self._configs = []
            try:
                layout = discover_cache(model, str(exc))
            except ValueError as no_cache:  # neither route reaches the layers: input-style prompts only
                enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
                layout = Layout([], encoder_decoder=enc_dec, kind="input", reason=str(no_cache))
        except BaseException:
            restore_configs(self._configs)
            raise
        info = ModelInfo(model, layout)
        if config.trainable_head and not info.head_parameters():
            restore_configs(self._configs)
            raise ValueError(
                f"trainable_head=True but {type(model).__name__} has no task head outside its backbone"
            )

        if layout.kind == "input":
            refuse_layer_prompts(config, model, layout.reason)
        self.model = model
        self.info = info
        self.prompt_config = config
        # Models that run sequence-first look their ids up as [T, B] (XLNet): found by a probe, since a
        # check per forward would read the data (and break torch.compile's graph).
        self._seq_first = layout.kind == "input" and embeddings_seq_first(model, info.input_embeddings)
        try:
            self.method: PromptMethod = build_method(config, info, **options)
        except BaseException:
            restore_configs(self._configs)
            raise
        self.method.to(info.device)
        # Further named prompt sets on the same frozen model (add_prompt_set), chosen per batch row.
        self.prompt_sets = nn.ModuleDict()
        self._pending_sets = None
        self.last_aux_losses: dict[str, torch.Tensor] = {}

        self._stack: list[ForwardContext | None] = []
        self._encoder_pushed: list[bool] = []
        self._disabled = 0
        self._generation: _Generation | None = None
        # generate() puts the prompts into the key/value cache at the prefill (PromptedCacheLayer) where
        # a check on the first generate shows it exact (cache_prompts.py); False keeps them out (every
        # decoding step then joins them in the attention).
        self.cache_prompts = True
        self._cache_route_exact: bool | None = None
        # The cache route under gradient checkpointing: transformers' checkpointed layers drop a cache
        # unless the layer says it only reads it, which the prompt cache's layers make true (prompt_cache.py).
        self._checkpoint_layers = checkpointing_layers(model) if info.layout.kind == "cache" else []
        self._signatures: dict[int, tuple[str, ...]] = {}
        self._cached_input_prompt = 0  # input-style rows in the key/value cache of the last prefill
        self._detached = False
        self._one = torch.ones(1, device=info.device)
        self._forward_params = list(inspect.signature(model.forward).parameters.values())
        self._accepts = {p.name for p in self._forward_params}
        self._placeholder = int(getattr(model.config, "pad_token_id", None) or 0)
        # Freeze (remembering every flag), bind the attention modules, hook the hosts. A refusal on the
        # way (e.g. a sequence-style method on a model without a single stack of layers) leaves the
        # model as it was: config, attention implementation, flags, bindings and hooks.
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        try:
            self._sequence_layer = self._resolve_sequence_layer()
            for p in model.parameters():
                p.requires_grad_(False)
            if config.trainable_head:
                for p in info.head_parameters().values():
                    p.requires_grad_(True)
            if info.layout.kind == "interface":
                self._bind_attention(inner)
            self._register_hooks()
        except BaseException:
            self._undo()
            raise
        # The model's forward signature on our forward (Trainer keeps the columns it names).
        # The model's forward signature on our forward, at class level too: Trainer keeps the dataset
        # columns it names and finds the label arguments on the class (find_labels), so eval_loss and
        # compute_metrics work without label_names.
        self.__class__ = _prompted_class(type(model), self._forward_params)
        self.train(model.training)  # the prompts follow the model's train/eval mode
        if self._sequence_layer is not None:
            self._probe_sequence_style()

    # -- set-up ------------------------------------------------------------------------------------
    def _resolve_sequence_layer(self) -> int | None:
        layer = self.method.sequence_layer
        if layer is None:
            return None
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.info.num_layers:
            raise ValueError(f"sequence_layer must be an int in [0, {self.info.num_layers}), got {layer!r}")
        sites = self.info.sites
        single = len({id(s.host) for s in sites}) == len(sites) and all(
            s.stack == "model" and s.host is not s.module for s in sites
        )
        if not single or len(self.info.layout.hosts) != len(sites):
            raise ValueError(
                f"sequence-style prompts need a single stack of layers with one self-attention each; "
                f"{type(self.model).__name__} has {len(sites)} attention sites in "
                f"{len(self.info.layout.hosts)} layers ({'encoder-decoder' if self.info.encoder_decoder else 'shared or hybrid layers'})"
            )
        return layer

    def _probe_sequence_style(self) -> None:
        """One no-grad eval forward of a probe batch with the sequence rows in place. Models whose layers
        take per-token inputs the rows would also need (relative position tables, layout boxes, extra
        hidden streams, ...) are refused here, with their error, rather than in the first training step;
        the model is left as it was."""
        from prompt_kernels.patch.discovery import probe_inputs

        inputs = probe_inputs(self.model)
        # Two rows, the second one padded: some layers treat a padded batch differently (state-space
        # branches of hybrids mask their input with the 2D mask).
        inputs["input_ids"] = inputs["input_ids"].repeat(2, 1)
        inputs["attention_mask"] = inputs["attention_mask"].repeat(2, 1)
        inputs["attention_mask"][1, -1] = 0
        if "decoder_input_ids" in inputs:
            inputs["decoder_input_ids"] = inputs["decoder_input_ids"].repeat(2, 1)
        # Stand-in hooks: zero rows and nothing else, so the probe tests the layers and the method sees
        # no call (no recorded prompts, no statistics).
        p = int(self.prompt_config.prompt_length)
        rows = torch.zeros(1, p, self.info.hidden_size, device=self.info.device, dtype=self.info.dtype)
        stand_ins = {
            "input_prompts": lambda ctx: None,
            "prefix": lambda ctx, idx: None,
            "sequence_init": lambda ctx: rows,
            "sequence_update": lambda ctx, idx, r: r,
            "aux_losses": lambda ctx, output: {},
        }
        try:
            with self.method_stand_ins(stand_ins), torch.no_grad():
                self(**inputs)
        except Exception as exc:
            self._undo()
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ValueError(
                f"sequence-style prompts ({type(self.method).__name__}) do not run on {type(self.model).__name__}: "
                f"its layers fail with the prompt rows in front of the hidden states ({type(exc).__name__}: "
                f"{first}); prefix-style and input-style methods do not insert rows"
            ) from exc

    @contextlib.contextmanager
    def method_stand_ins(self, hooks: dict):
        """The method's hooks replaced by ``hooks`` (name -> function, set on the instance) and the model in
        eval mode for the duration, for probe forwards the method must not see; both restored after."""
        method = self.method
        modes = [(m, m.training) for m in self.modules()]
        own = {name: method.__dict__[name] for name in hooks if name in method.__dict__}
        try:
            for name, fn in hooks.items():
                object.__setattr__(method, name, fn)
            self.eval()
            yield
        finally:
            for name in hooks:
                method.__dict__.pop(name, None)
            method.__dict__.update(own)
            for m, mode in modes:
                m.training = mode

    def _bind_attention(self, inner: str) -> None:
        """An AttentionBinding on every module that calls the attention interface (prompted sites and the
        unprompted ones the probe saw, e.g. cross-attention), and on other attention modules a later
        forward may reach (e.g. a BERT decoder's cross-attention, unused by the probe)."""
        info = self.info
        sites_of: dict[int, set[int]] = {}
        for s in info.sites:
            sites_of.setdefault(id(s.module), set()).add(s.index)
        for s in info.sites:
            if not hasattr(s.module, BINDING_ATTR):
                binding = AttentionBinding(
                    inner, model_eager_function(s.module), frozenset(sites_of[id(s.module)])
                )
                self._bind(s.module, binding)
        for m in [*info.layout.unprompted, *self.model.modules()]:
            if not hasattr(m, BINDING_ATTR) and (
                m in info.layout.unprompted or "Attention" in type(m).__name__
            ):
                self._bind(m, AttentionBinding(inner, model_eager_function(m), frozenset()))

    def _bind(self, module: nn.Module, binding: AttentionBinding) -> None:
        setattr(module, BINDING_ATTR, binding)
        self._bound.append(module)

    def _register_hooks(self) -> None:
        h = self._handles
        info = self.info
        h.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        h.append(self.model.register_forward_hook(self._on_model_end, always_call=True))
        h.append(info.input_embeddings.register_forward_hook(self._on_embeddings))
        for m in info.layout.position_modules:
            h.append(m.register_forward_pre_hook(self._on_position_module_start, with_kwargs=True))
        if info.layout.cache_module is not None:
            h.append(
                info.layout.cache_module.register_forward_pre_hook(
                    self._on_cache_module_start, with_kwargs=True
                )
            )
        if info.encoder_decoder:
            encoder = self.model.get_encoder()
            h.append(encoder.register_forward_pre_hook(self._on_encoder_start, with_kwargs=True))
            h.append(encoder.register_forward_hook(self._on_encoder_end, always_call=True))
        # Per host: which sites it serves on its k-th call within one forward.
        self._host_sites: dict[tuple[int, int], list[int]] = {}
        for s in info.sites:
            self._host_sites.setdefault((id(s.host), s.host_call), []).append(s.index)
        self._mask_index: dict[int, int | None] = {}
        for host in info.layout.hosts:
            self._mask_index[id(host)] = param_index(host.forward, "attention_mask")
            h.append(host.register_forward_pre_hook(self._host_start_hook(host), with_kwargs=True))
        if self._sequence_layer is not None:
            for s in info.sites[self._sequence_layer :]:
                h.append(s.host.register_forward_hook(self._layer_end_hook(s.index)))
        h.extend(self.method.model_hooks())

    def _undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for m in self._bound:
            if hasattr(m, BINDING_ATTR):
                delattr(m, BINDING_ATTR)
        self._bound = []
        restore_configs(self._configs)
        self._configs = []
        for n, p in self.model.named_parameters(remove_duplicate=False):
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))

    # -- public API --------------------------------------------------------------------------------
    def _call_model(self, *args, prompt_set=None, **kwargs):
        """Run the model with the prompts: the model's own arguments and output type.

        ``prompt_set``: which named prompt set (see :meth:`add_prompt_set`) each batch row uses: one name
        for the whole batch, or a list of ``B`` names (``"default"`` is the set ``attach`` made)."""
        if self._detached:
            raise RuntimeError("this PromptedModel was detached")
        if prompt_set is None:
            return self.model(*args, **kwargs)
        self._pending_sets = prompt_set
        try:
            return self.model(*args, **kwargs)
        finally:
            self._pending_sets = None

    def add_prompt_set(self, name: str, source, **options) -> PromptMethod:
        """Another named prompt set on this frozen model: ``source`` is a prompt config (fresh prompts, to
        train: ``pm.prompt_sets[name].parameters()``) or a folder written by ``save_prompts`` /
        ``save_pretrained`` (loaded; the base model is checked as ``load_prompts`` checks it). Every set
        must be of the default set's method and prompt length, so one batch can mix them row by row
        (``pm(..., prompt_set=["default", name, ...])``; each row's output equals running it alone
        with its set). ``options`` go to the method as ``attach``'s do (e.g. InfoPrompt's
        ``label_embeddings=``). Returns the set's method module."""
        from prompt_kernels.configs import config_from_dict

        if not isinstance(name, str) or not name or name == "default" or name in self.prompt_sets:
            raise ValueError(f"name must be a new prompt set name other than 'default', got {name!r}")
        tensors = None
        if isinstance(source, PromptConfig):
            config = source
        else:
            meta, tensors = io.read_prompt_files(source)
            config = config_from_dict(meta["prompt_config"])
            saved = meta.get("base_model", {})
            diff, _ = io.compare_fingerprints(saved, io.fingerprint(self.model, self.info, like=saved), False)
            if diff:
                raise ValueError(
                    f"the prompts in {source} were trained on another base model: {'; '.join(diff)}"
                )
        if (
            type(config) is not type(self.prompt_config)
            or config.prompt_length != self.prompt_config.prompt_length
        ):
            raise ValueError(
                f"a prompt set must be a {type(self.prompt_config).__name__} with prompt_length="
                f"{self.prompt_config.prompt_length} like the default set, got {type(config).__name__} with "
                f"prompt_length={config.prompt_length}"
            )
        if self._sequence_layer is not None:
            raise NotImplementedError(
                "several prompt sets per batch are not supported for sequence-style methods"
            )
        # One head serves every row: a set cannot bring (or train) its own without losing it silently.
        if config.trainable_head or (
            tensors is not None and any(k.startswith(io.HEAD_PREFIX) for k in tensors)
        ):
            raise ValueError(
                f"prompt set {name!r} has its own trained head (trainable_head=True): the rows of all prompt "
                "sets share the model's one head, so a set must be prompts only; load that run on its own "
                "with prompt_kernels.load_prompts"
            )
        method = build_method(config, self.info, **options).to(self.info.device)
        if tensors is not None:
            prefix = io.METHOD_PREFIX
            method.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        method.train(self.training)
        self._handles.extend(method.model_hooks())
        self.prompt_sets[name] = method
        return method

    def generate(self, *args, **kwargs):
        """``model.generate`` with the prompts at every step (computed once, on the prefill)."""
        if self._detached:
            raise RuntimeError("this PromptedModel was detached")
        if not (hasattr(self.model, "can_generate") and self.model.can_generate()):
            raise TypeError(f"{type(self.model).__name__} cannot generate (not a causal LM)")
        grows = False
        if self.info.layout.kind == "cache":
            # Its prompts travel in the key/value cache: generate's own cache takes them at the prefill and
            # grows with the tokens where the first generate's check shows that exact (decoder-only models
            # whose forward takes the cache); else every step recomputes the whole sequence (O(T^2)).
            if self.cache_prompts and kwargs.get("use_cache") is not False:
                if self._cache_route_exact is None:
                    self._cache_route_exact = cache_route_grows_exactly(self, _Generation)
                grows = self._cache_route_exact
            if kwargs.get("use_cache") and not grows:
                raise NotImplementedError(
                    f"generate(use_cache=True) with prompts on {type(self.model).__name__} is not supported: it "
                    "does not use transformers' attention interface, its prompts travel in the key/value cache, "
                    "and decoding with them in generate's cache is off (cache_prompts=False) or was not exact on "
                    "it; generate() recomputes every step instead (use_cache=False, the default here)"
                )
            kwargs["use_cache"] = (
                grows  # the check decoded with use_cache=True; some configs default to False
            )
        if self._sequence_layer is not None:
            raise NotImplementedError(
                "generate() with sequence-style prompts is not supported (the rows would "
                "sit in part of the key/value cache only)"
            )
        inject = False
        if self.cache_prompts and self.info.layout.kind != "cache":
            if self._cache_route_exact is None:
                self._cache_route_exact = cache_route_is_exact(self, _Generation)
            inject = self._cache_route_exact
        self._generation = _Generation()
        self._generation.inject = inject
        self._generation.cache_grows = grows
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._generation = None

    def detach(self) -> nn.Module:
        """Remove the prompts: hooks, bindings, attention implementation and requires_grad flags restored.
        Returns the model (its parameters were never modified)."""
        if self._detached:
            raise RuntimeError("this PromptedModel was already detached")
        model = self.model
        self._undo()
        self._detached = True
        del self._modules["model"]
        return model

    @contextlib.contextmanager
    def disabled(self):
        """Within this block, forwards of the model run without any prompt (as the frozen model)."""
        self._disabled += 1
        try:
            yield
        finally:
            self._disabled -= 1

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: the method's prompts (and the task head with ``trainable_head``)."""
        head = self.info.head_parameters().values() if self.prompt_config.trainable_head else ()
        return itertools.chain(self.method.prompt_parameters(), head)

    @property
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def config(self):
        """The model's (transformers) config; the prompt config is ``prompt_config``."""
        return self.model.config

    def save_prompts(self, path) -> None:
        """Write the prompts (and the head, if trained) and the config to the folder ``path``; never the
        base model's own weights."""
        io.save_prompts(self, path)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """PEFT's name for :meth:`save_prompts` (``prompts.safetensors`` + ``config.json``). The keyword
        arguments ``Trainer`` passes (``state_dict``, ``safe_serialization``, ...) are accepted; what is
        written is always the prompts, read from this PromptedModel."""
        os.makedirs(save_directory, exist_ok=True)
        self.save_prompts(save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, **options) -> PromptedModel:
        """PEFT's name for :func:`load_prompts`: the prompts saved in ``path`` attached to ``model``."""
        return load_prompts(model, path, **options)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """What attaching adds or trains, and nothing of the frozen base model: the method's state
        (``method.*``) and, with ``trainable_head``, the task head (``model.<name>``). This is what
        ``Trainer`` checkpoints and reloads; the base model's own weights are ``pm.model.state_dict()``."""
        if args:
            raise TypeError(
                "PromptedModel.state_dict takes keyword arguments only (destination, prefix, keep_vars)"
            )
        out = {} if destination is None else destination
        for k, v in self.method.state_dict(keep_vars=keep_vars).items():
            out[f"{prefix}method.{k}"] = v
        for name, method in self.prompt_sets.items():
            for k, v in method.state_dict(keep_vars=keep_vars).items():
                out[f"{prefix}prompt_sets.{name}.{k}"] = v
        if self.prompt_config.trainable_head:
            for k, v in self.info.head_parameters().items():
                out[f"{prefix}model.{k}"] = v if keep_vars else v.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what :meth:`state_dict` returns. With ``strict``, a key of the prompts' state missing from
        ``state_dict`` or a key that is not part of it raises; the base model's weights are never
        touched (a full ``nn.Module``-style state dict's base-model keys are ignored only when not
        ``strict``)."""
        own = self.state_dict(keep_vars=True)
        unexpected = [k for k in state_dict if k not in own]
        missing = [k for k in own if k not in state_dict]
        if strict and (unexpected or missing):
            raise RuntimeError(
                f"PromptedModel.load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
                "(the state of a PromptedModel is its prompts and, if trained, its head)"
            )
        method_sd = {k[len("method.") :]: v for k, v in state_dict.items() if k.startswith("method.")}
        result = self.method.load_state_dict(method_sd, strict=strict, assign=assign)
        for name, method in self.prompt_sets.items():
            head = f"prompt_sets.{name}."
            sd = {k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)}
            method.load_state_dict(sd, strict=strict, assign=assign)
        with torch.no_grad():
            for k, v in state_dict.items():
                if k.startswith("model.") and k in own:
                    own[k].copy_(v)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected) if not strict else result

    def print_trainable_parameters(self) -> None:
        """``trainable params: ... || all params: ... || trainable%: ...`` (as PEFT prints it)."""
        trainable = self.num_trainable_parameters
        total = trainable + sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in PEFT_ONLY:
                raise NotOffered(
                    f"PromptedModel.{name}: {PEFT_ONLY[name]} (a PEFT call prompt_kernels does not offer; it is "
                    "not passed on to the base model)"
                ) from None
            model = self.__dict__["_modules"].get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)

    # -- hooks: the model ------------------------------------------------------------------------------
    def _current(self) -> ForwardContext | None:
        return self._stack[-1] if self._stack else None

    def _on_model_start(self, module, args, kwargs):
        # Push first: the always-called end hook pops once per call, even when this hook raises.
        self._stack.append(None)
        if self._disabled or self._detached:
            return None
        if args:
            names = [
                p.name for p in self._forward_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if len(args) > len(names):
                raise TypeError("too many positional arguments for the model's forward")
            kwargs = {**dict(zip(names, args)), **kwargs}
        depth = sum(c is not None for c in self._stack)
        ctx = ForwardContext(self, dict(kwargs), depth)
        self._stack[-1] = ctx
        if self._pending_sets is not None and depth == 0:
            ctx.row_sets = self._row_sets(self._pending_sets, ctx.batch_size, ctx.device)
        if self.info.layout.module_hosts and self.model.training and torch.is_grad_enabled():
            if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
                raise NotImplementedError(
                    f"gradient checkpointing of {type(self.model).__name__} with prompts is not supported: its layers "
                    "do not pass keyword arguments to their attention, so a recomputed layer would lose its prompts"
                )
        if (
            self.info.encoder_decoder
            and kwargs.get("input_ids") is None
            and kwargs.get("inputs_embeds") is None
        ):
            kwargs = self._extend_encoder_mask(dict(kwargs))
        else:
            kwargs = self._apply_input_style(ctx, dict(kwargs))
        if self.info.layout.kind == "cache":
            kwargs = self._apply_cache_prompts(ctx, kwargs)
        if self._sequence_layer is not None:
            if ctx.decoding:
                raise NotImplementedError(
                    "sequence-style prompts do not support decoding with a key/value cache"
                )
            if "use_cache" in self._accepts:
                kwargs["use_cache"] = False
        return (), kwargs

    def _row_sets(self, names, B: int, device) -> dict[str, torch.Tensor] | None:
        """``prompt_set`` of a call -> {set name: its rows} (None when every row uses the default set)."""
        if isinstance(names, str):
            names = [names] * B
        if not isinstance(names, (list, tuple)) or len(names) != B:
            raise ValueError(
                f"prompt_set must be a set name or a list of {B} names (one per batch row), got {names!r}"
            )
        unknown = sorted({n for n in names if n != "default" and n not in self.prompt_sets})
        if unknown:
            raise ValueError(f"unknown prompt sets {unknown}; known: ['default', *{list(self.prompt_sets)}]")
        if all(n == "default" for n in names):
            return None
        if self._sequence_layer is not None:
            raise NotImplementedError(
                "several prompt sets per batch are not supported for sequence-style methods"
            )
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        return {n: torch.tensor(rows, device=device) for n, rows in groups.items()}

    def _set_method(self, name: str) -> PromptMethod:
        return self.method if name == "default" else self.prompt_sets[name]

    def _per_row(self, ctx: ForwardContext, hook: str, *args):
        """Call ``hook`` of the method of every prompt set the batch uses and gather each row's result
        from its own set: prompt tensors ``[1|B, ...]`` -> ``[B, ...]``; prefixes as (key, value, gate)."""
        if ctx.row_sets is None:
            return getattr(self.method, hook)(ctx, *args)
        B = ctx.batch_size
        results = {}
        for name in ctx.row_sets:
            with ctx.scope(None if name == "default" else name):
                results[name] = getattr(self._set_method(name), hook)(ctx, *args)
        if all(r is None for r in results.values()):
            return None
        if any(r is None for r in results.values()):
            raise ValueError(f"{hook}: the prompt sets of one batch must all prompt the same layers")
        order = torch.cat(list(ctx.row_sets.values()))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B, device=order.device)

        def gather(parts):  # per set a tensor [1|B, ...] -> [B, ...] with each row from its own set
            rows = [p.expand(B, *p.shape[1:])[ctx.row_sets[n]] for n, p in parts.items()]
            return torch.cat(rows)[inverse]

        if hook == "input_prompts":
            return gather(results)
        triples = {n: tuple(r) for n, r in results.items()}  # (key, value, gate) or PrefixKV
        key = gather({n: t[0] for n, t in triples.items()})
        value = gather({n: t[1] for n, t in triples.items()})
        if all(t[2] is None for t in triples.values()):
            return key, value, None
        H = self.info.sites[args[0]].num_heads
        ones = torch.ones(1, H, device=key.device)
        gates = {
            n: (
                ones
                if t[2] is None
                else t[2].float().expand(1, H)
                if t[2].dim() < 2
                else t[2].float().expand(-1, H)
            )
            for n, t in triples.items()
        }
        return key, value, gather({n: g.expand(g.shape[0], H) for n, g in gates.items()})

    def _extend_encoder_mask(self, kwargs: dict) -> dict:
        """A decoder call of an encoder-decoder with ``encoder_outputs`` (``generate``): the encoder output
        holds the input-style rows in front, so its 2D attention mask gets as many ones in front."""
        p, mask, enc = self._cached_input_prompt, kwargs.get("attention_mask"), kwargs.get("encoder_outputs")
        if p and mask is not None and mask.dim() == 2 and enc is not None:
            states = enc[0] if isinstance(enc, (tuple, list)) else enc.get("last_hidden_state")
            if torch.is_tensor(states) and states.shape[1] == mask.shape[1] + p:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        return kwargs

    # -- hooks: an encoder-decoder's encoder, when run by itself (generate) -------------------------------
    def _on_encoder_start(self, module, args, kwargs):
        pushed = not (self._stack or self._disabled or self._detached)
        self._encoder_pushed.append(pushed)
        if not pushed:
            return None
        if args:
            names = [p.name for p in inspect.signature(module.forward).parameters.values()]
            kwargs = {**dict(zip(names, args)), **kwargs}
        self._stack.append(None)
        ctx = ForwardContext(self, dict(kwargs), 0)
        self._stack[-1] = ctx
        return (), self._apply_input_style(ctx, dict(kwargs))

    def _on_encoder_end(self, module, args, output):
        if self._encoder_pushed and self._encoder_pushed.pop() and self._stack:
            self._stack.pop()

    def _on_model_end(self, module, args, output):
        # The context stays on the stack while aux_losses runs, so a forward started from there is
        # nested (depth >= 1); popped in any case, also when the forward raised (output None).
        try:
            ctx = self._stack[-1] if self._stack else None
            if ctx is None or output is None:
                return None
            ctx.output = output
            aux = self.method.aux_losses(ctx, output) or {}
            if ctx.row_sets is not None and aux:
                raise NotImplementedError(
                    f"{type(self.method).__name__} adds training losses; a batch mixing prompt sets cannot "
                    "attribute them (run each set's rows as their own batch)"
                )
        finally:
            if self._stack:
                self._stack.pop()
            if ctx is not None and ctx.checkpoint_flags:
                restore_flags(ctx.checkpoint_flags)
        if ctx.depth == 0:
            self.last_aux_losses = dict(aux)
            gen = self._generation
            if (
                self.info.layout.kind == "cache"
                and gen is not None
                and not gen.cache_grows
                and isinstance(output, dict)
            ):
                # The cache of this step holds the prompts: generate must not hand it to the next step. An
                # empty one takes its place (beam search reorders it; the next step drops it again).
                from transformers import DynamicCache

                for name in CACHE_KWARGS:
                    if output.get(name) is not None:
                        output[name] = DynamicCache()
        if not aux or ctx.labels is None:
            return None
        total = sum(aux.values())
        if isinstance(output, dict) and output.get("loss") is not None:
            output["loss"] = output["loss"] + total
            return output
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
            return (output[0] + total, *output[1:])
        return None

    def _apply_input_style(self, ctx: ForwardContext, kwargs: dict) -> dict:
        info = self.info
        B, T = ctx.batch_size, ctx.seq_len
        if ctx.decoding and not info.encoder_decoder:
            p = self._cached_input_prompt
            if p and ctx.depth == 0:
                mask = kwargs.get("attention_mask")
                if mask is not None and mask.dim() == 2 and mask.shape[1] + p == ctx.past_length + T:
                    kwargs["attention_mask"] = torch.cat([mask.new_ones(B, p), mask], dim=1)
                if kwargs.get("position_ids") is None and "position_ids" in self._accepts:
                    kwargs["position_ids"] = info.positions.default_ids(
                        None, T, ctx.past_length - p, ctx.device
                    ).expand(B, -1)
            return kwargs
        prompts = self._per_row(ctx, "input_prompts")
        if ctx.depth == 0:
            self._cached_input_prompt = 0
        if prompts is None:
            return kwargs
        if (
            prompts.dim() != 3
            or (prompts.shape[0] != 1 and prompts.shape[0] != B)
            or prompts.shape[2] != info.hidden_size
        ):
            raise ValueError(
                f"input_prompts must have shape [B={B} or 1, p, d={info.hidden_size}], got {tuple(prompts.shape)}"
            )
        p = prompts.shape[1]
        refuse_other_per_token_inputs(kwargs, B, T, info.encoder_decoder, self._generation is not None)
        ctx.input_prompt_length = p
        if ctx.depth == 0:
            self._cached_input_prompt = p
        if kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            kwargs["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype).expand(B, -1, -1), embeds], dim=1)
        else:
            ids = kwargs["input_ids"]
            kwargs["input_ids"] = torch.cat([ids.new_full((B, p), self._placeholder), ids], dim=1)
            ctx.cache["_pending_input_prompts"] = prompts
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("input-style prompts need a 2D attention_mask [B, T] (or none)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(B, p), mask], dim=1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], p, *tt.shape[2:]), tt], dim=1)
        if "position_ids" in self._accepts:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = info.positions.default_ids(ctx.input_ids, T, ctx.past_length, ctx.device).expand(B, -1)
            first = info.positions.first
            kwargs["position_ids"] = torch.cat([pos.new_full((pos.shape[0], p), first), pos], dim=1)
        labels = kwargs.get("labels")
        # Token-level labels (causal / masked LM, token classification): integer [B, T, ...]. An
        # encoder-decoder's labels are the decoder's: they stay as they are.
        if (
            not info.encoder_decoder
            and labels is not None
            and labels.dim() >= 2
            and labels.shape[1] == T
            and not labels.is_floating_point()
        ):
            kwargs["labels"] = torch.cat(
                [labels.new_full((labels.shape[0], p, *labels.shape[2:]), -100), labels], dim=1
            )
        return kwargs

    def _on_embeddings(self, module, args, output):
        ctx = self._current()
        if ctx is None:
            return None
        prompts = ctx.cache.pop("_pending_input_prompts", None)
        p = 0 if prompts is None else prompts.shape[1]
        # Models that run sequence-first (XLNet) look up the ids transposed: [p + T, B] -> [p + T, B, d].
        extra = ()
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            output, extra = output[0], output[1:]  # (embeddings, ...): quantised models (I-BERT)
        first = self._seq_first and output.dim() == 3
        if first:
            output = output.transpose(0, 1)
        # Keep the real tokens' embeddings of the model's own lookup for ctx.input_embeddings: a method
        # reading them after the forward then needs no second lookup (which FSDP2 would have resharded).
        if (
            ctx._inputs_embeds is None
            and ctx.input_ids is not None
            and output.dim() == 3
            and tuple(output.shape[:2]) == (ctx.batch_size, p + ctx.input_ids.shape[1])
        ):
            ctx._inputs_embeds = (
                output[:, p:].detach().clone()
            )  # a copy: the model may modify its own in place
        if prompts is None:
            return None
        out = torch.cat([prompts.to(output.dtype).expand(output.shape[0], -1, -1), output[:, p:]], dim=1)
        out = out.transpose(0, 1) if first else out
        return (out, *extra) if extra else out

    # -- hooks: the layers -----------------------------------------------------------------------------
    def _host_start_hook(self, host: nn.Module):
        key = id(host)

        def hook(layer, args, kwargs):
            ctx = self._current()
            if ctx is None:
                return None
            call = ctx.host_calls.get(key, 0)
            ctx.host_calls[key] = call + 1
            sites = self._host_sites.get((key, call))
            return None if not sites else self._on_host_start(ctx, key, sites, args, kwargs)

        return hook

    def _layer_end_hook(self, idx: int):
        def hook(layer, args, output):
            ctx = self._current()
            return None if ctx is None else self._on_layer_end(ctx, idx, output)

        return hook

    def _on_host_start(self, ctx: ForwardContext, host: int, sites: list[int], args, kwargs):
        gen = self._generation
        if gen is not None and ctx.decoding and ctx.depth == 0:
            marker = gen.cached.get(host, False)
            if marker is False:
                marker = gen.cached[host] = self._cached_prompts(ctx, sites)
            if marker is not None:
                kwargs[PREFIX_KWARG] = marker
                return args, kwargs
        args = list(args)
        from_args = bool(args)
        hidden = args[0] if from_args else kwargs.get("hidden_states")
        seq_p = ctx.cache.get("_sequence_rows", 0)
        mi = self._mask_index[host]
        in_args = mi is not None and mi < len(args)
        mask = args[mi] if in_args else kwargs.get("attention_mask")
        changed = False
        for idx in sites:
            ctx.layer_inputs[idx] = hidden
            # Input-style rows sit in front of the stack that reads input_ids (an encoder-decoder's encoder).
            reads_inputs = not self.info.encoder_decoder or self.info.in_encoder(idx)
            ctx.rows_in_front[idx] = (ctx.input_prompt_length if reads_inputs else 0) + seq_p

        idx = sites[0]
        if self._sequence_layer is not None and idx >= self._sequence_layer:
            if idx == self._sequence_layer:
                rows = self.method.sequence_init(ctx)
                if rows is not None:
                    rows = self._check_rows(rows, ctx, "sequence_init")
                    hidden = torch.cat([rows.to(hidden.dtype).expand(hidden.shape[0], -1, -1), hidden], dim=1)
                    seq_p = rows.shape[1]
                    ctx.cache["_sequence_rows"] = seq_p
                    changed = True
            if seq_p:
                key = ("_sequence_mask", id(mask))
                hit = ctx.cache.get(key)
                if hit is None or hit[0] is not mask:
                    hit = (mask, seq.extend_mask(mask, seq_p, self.info.causal))
                    ctx.cache[key] = hit
                mask = hit[1]
                pe = kwargs.get("position_embeddings")
                if pe is not None:
                    key = ("_sequence_rotary", id(pe))
                    hit = ctx.cache.get(key)
                    if hit is None or hit[0] is not pe:
                        hit = (pe, seq.extend_rotary(pe, seq_p))
                        ctx.cache[key] = hit
                    kwargs["position_embeddings"] = hit[1]
                changed = True

        prompts = {}
        for idx in sites:
            prefix = self._layer_prefix(ctx, idx)
            if prefix is not None:
                prompts[idx] = prefix
        if prompts:
            cache = ctx.kv_cache
            gen = self._generation
            inject = cache is not None and gen is not None and gen.inject and ctx.depth == 0
            if mask is not None and torch.is_tensor(mask) and mask.dim() == 4:
                op_mask, op_causal = ctx.converted_mask(mask, self.info.sites[sites[0]].causal)
                kwargs[PREFIX_KWARG] = HostPrompts(
                    prompts, mask, op_mask, op_causal, ctx.direct_cpu, kv_cache=cache, inject=inject
                )
            else:
                kwargs[PREFIX_KWARG] = HostPrompts(
                    prompts, direct_cpu=ctx.direct_cpu, kv_cache=cache, inject=inject
                )
            changed = True
        if not changed:
            return None
        if from_args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden
        if in_args:
            args[mi] = mask
        elif "attention_mask" in kwargs or seq_p:
            kwargs["attention_mask"] = mask
        return tuple(args), kwargs

    def _cached_prompts(self, ctx: ForwardContext, sites: list[int]) -> CachedPrompts | None:
        """A decoding step's marker for a host whose sites' gate-1 prompts the prefill put into their
        cache layers (:class:`PromptedCacheLayer`), else None (the host takes the normal path)."""
        gen, rows = self._generation, {}
        for idx in sites:
            prefix = gen.prefix.get(idx)
            if prefix is None:
                if idx in gen.prefix:
                    continue  # a site without prompts
                return None
            layer = cache_layer_of(ctx.kv_cache, self.info.sites[idx].module)
            if not prefix.gate_is_one or not isinstance(layer, PromptedCacheLayer):
                return None
            rows[idx] = layer.prompt_rows
        return CachedPrompts(rows) if rows else None

    def _on_layer_end(self, ctx: ForwardContext, idx: int, output):
        p = ctx.cache.get("_sequence_rows", 0)
        if not p:
            return None
        hidden = output if torch.is_tensor(output) else output[0]
        rows, rest = hidden[:, :p], hidden[:, p:]
        new_rows = self.method.sequence_update(ctx, idx, rows)
        if new_rows is None or tuple(new_rows.shape) != tuple(rows.shape):
            raise ValueError(
                f"sequence_update must return rows of shape {tuple(rows.shape)}, got "
                f"{None if new_rows is None else tuple(new_rows.shape)}"
            )
        if idx == self.info.num_layers - 1:
            ctx.sequence_rows = new_rows
            ctx.cache["_sequence_rows"] = 0
            hidden = rest
        else:
            hidden = torch.cat([new_rows.to(hidden.dtype), rest], dim=1)
        return hidden if torch.is_tensor(output) else (hidden, *output[1:])

    def _check_rows(self, rows, ctx, hook: str) -> torch.Tensor:
        d = self.info.hidden_size
        if rows.dim() != 3 or (rows.shape[0] != 1 and rows.shape[0] != ctx.batch_size) or rows.shape[2] != d:
            raise ValueError(
                f"{hook} must return [B={ctx.batch_size} or 1, p, d={d}], got {tuple(rows.shape)}"
            )
        return rows

    def _layer_prefix(self, ctx: ForwardContext, idx: int) -> LayerPrompt | None:
        gen = self._generation if ctx.depth == 0 else None
        if gen is not None and idx in gen.prefix:
            prefix = gen.prefix[idx]
        else:
            # With the forward's own grad mode: a model may run some layer calls under no_grad (HRM's
            # early recurrence cycles) and a method may compute every layer's prompts on the first call.
            with torch.set_grad_enabled(ctx.grad_enabled):
                raw = self._per_row(ctx, "prefix", idx)
                prefix = None if raw is None else self._normalize_prefix(raw, ctx, idx)
            if gen is not None:
                gen.prefix[idx] = prefix
        return prefix

    def _normalize_prefix(self, raw, ctx: ForwardContext, idx: int) -> LayerPrompt:
        if isinstance(raw, PrefixKV):
            key, value, gate = raw.key, raw.value, raw.gate
        else:
            key, value, gate = raw
        B = ctx.batch_size
        hkv, dk, dv = self.info.kv_shapes[idx]
        for name, t, dim in (("key", key, dk), ("value", value, dv)):
            if (
                not torch.is_tensor(t)
                or t.dim() != 4
                or (t.shape[0] != 1 and t.shape[0] != B)  # not `in (1, B)`: wrong on symbolic sizes
                or t.shape[1] != hkv
                or t.shape[3] != dim
            ):
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(
                    f"prefix {name} of layer {idx} must have shape [B={B} or 1, Hkv={hkv}, p, {dim}], got {got}"
                )
        if value.shape[:3] != key.shape[:3]:
            raise ValueError(
                f"prefix value shape {tuple(value.shape)} does not match key shape {tuple(key.shape)}"
            )
        dtype = ctx.layer_inputs[idx].dtype if idx in ctx.layer_inputs else self.info.dtype
        gate_is_one = gate is None
        if gate is None:
            if self._one.device != key.device:
                self._one = torch.ones(1, device=key.device)
            gate = self._one
        return LayerPrompt(
            key.to(dtype),
            value.to(dtype),
            gate,
            gate_is_one=gate_is_one,
            attention_dropout=self.prompt_config.attention_dropout,
            route=self._route,
        )


def attach(model: nn.Module, config: PromptConfig, **options) -> PromptedModel:
    """Attach the prompt method described by ``config`` to ``model`` (a transformers PreTrainedModel).

    Freezes the model, routes its attention through the ``prompt_kernels`` implementation and returns
    the :class:`PromptedModel`. ``attention_route="concat"`` makes every prompted layer take the
    concatenation route through the model's own attention (the reference the fused op is tested
    against). Other ``options`` go to the method (e.g. ``tokenizer=`` for
    ``PromptTuningConfig(init="text", init_text=...)``). Raises ValueError for a model whose attention
    does not go through transformers' attention interface.
    """
    return PromptedModel(model, config, **options)


def load_prompts(model: nn.Module, path, **options) -> PromptedModel:
    """Rebuild the PromptedModel saved by ``save_prompts(path)`` / ``save_pretrained(path)`` on ``model``
    (a fresh copy of the base model, in any dtype, on any device). Raises ValueError naming what differs
    if ``model`` is not the base model the prompts were trained on; ``model`` is then left as it was."""
    return io.load_prompts_with(attach, model, path, **options)
