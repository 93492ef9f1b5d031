"""Discovery: where a transformers model's attention goes through the attention interface.

Nothing here is per model class. ``discover(model)`` runs one small forward of the model (batch 1, a
few tokens, no gradient) with every attention call routed to a recorder, and reads from those calls:

- the self-attention sites (query and key from the same stream) in the order the forward reaches
  them: encoder before decoder, attention layers of hybrid models only (recurrent / linear-attention
  layers never call the interface); cross-attention calls are recorded as unprompted sites;
- each site's number of query and key/value heads and key and value head sizes (they may differ
  per layer, and between keys and values), its ``scaling``, whether it is causal, and the extra
  keyword arguments it receives (``softcap``, ``sinks``, ``position_bias``, ...);
- the *host* of each site: the layer (outermost ``GradientCheckpointingLayer``, else the outermost
  ``nn.ModuleList`` element around it) whose keyword arguments reach the attention call. Prompts
  travel in those keyword arguments, so they survive gradient-checkpoint recomputation; the probe
  checks that they arrive.

The model must already run the ``prompt_kernels`` attention implementation (``attach`` switches it);
what a probe records lives in a ``ContextVar`` for the duration of the probe only.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

ENCODER, DECODER, MODEL = "encoder", "decoder", "model"


class NoAttentionInterface(ValueError):
    """The model does not route its attention through transformers' attention interface."""


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention call of a forward that takes prompts (``index`` = its prompt slot ``l``).

    ``host`` is the layer whose keyword arguments carry the prompts (``host_call``: which call of the
    host within one forward, for layers run several times), ``stack`` the encoder or decoder.
    """

    index: int
    name: str
    module: nn.Module | None  # None on the cache route
    host: nn.Module | None
    host_name: str
    host_call: int
    stack: str
    num_heads: int
    num_kv_heads: int
    key_dim: int
    value_dim: int
    causal: bool
    scaling: float | None
    extras: frozenset[str] = frozenset()


@dataclass
class Layout:
    """What ``discover`` found: the prompted sites in order and the unprompted attention modules."""

    sites: list[AttentionSite]
    unprompted: list[nn.Module] = field(default_factory=list)
    encoder_decoder: bool = False
    module_hosts: bool = False  # some attention modules host their own prompts (layer drops kwargs)
    # "interface": prompts joined inside the attention function (the normal route); "cache": the model
    # does not use the attention interface, and prefix prompts travel as a pre-filled key/value cache;
    # "input": neither reaches its layers (no sites): input-style prompts only, ``reason`` says why.
    kind: str = "interface"
    reason: str = ""
    cache_kwarg: str | None = None  # the forward's cache keyword ("cache" or "past_key_values")
    cache_wrap: str = (
        "dynamic"  # "encoder_decoder": the model keeps its self-attention cache in an EncoderDecoderCache
    )
    # The module whose forward receives the cache: None = the model's own forward; else the outermost
    # module below it that takes one (its base model, or, as in TAPAS, the encoder below that).
    cache_module: nn.Module | None = None
    # Cache route: embedding modules that count positions from the cache length (``cache_length``); they
    # are given the tokens' count without the prompt rows, so the tokens keep their positions.
    position_modules: list[nn.Module] = field(default_factory=list)

    @property
    def hosts(self) -> list[nn.Module]:
        seen, out = set(), []
        for s in self.sites:
            if s.host is not None and id(s.host) not in seen:
                seen.add(id(s.host))
                out.append(s.host)
        return out


@dataclass
class _Call:
    module: nn.Module
    query: tuple
    key: tuple
    value: tuple
    kwargs: dict
    hosts: tuple  # (host module, call number) of the host calls enclosing this attention call
    token: object  # the probe token that reached the attention function (None: none arrived)


class _Recorder:
    def __init__(self, kwarg: str, inner: str):
        self.kwarg = kwarg
        self.inner = inner  # the implementation the probe's attention calls run through
        self.calls: list[_Call] = []
        self.host_stack: list[tuple[nn.Module, int]] = []
        self.host_counts: dict[int, int] = {}
        self.same_lengths = False  # encoder and decoder inputs of the same length (see _is_self)


_PROBE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "prompt_kernels_probe", default=None
)


def recording() -> _Recorder | None:
    """The active probe's recorder (the attention function records into it), or None."""
    return _PROBE.get()


def record_call(rec: _Recorder, module, query, key, value, kwargs) -> None:
    token = kwargs.get(rec.kwarg)
    rec.calls.append(
        _Call(
            module,
            tuple(query.shape),
            tuple(key.shape),
            tuple(value.shape),
            {k: v for k, v in kwargs.items() if k != rec.kwarg},
            tuple(rec.host_stack),
            token,
        )
    )


def accepts_var_kwargs(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in params)


def candidate_hosts(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """The layers of the model's stacks: outermost ``GradientCheckpointingLayer``s, or (in models without
    them) the elements of the outermost ``nn.ModuleList``s. ``{id(module): (name, module)}``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    named = list(model.named_modules())
    out: dict[int, tuple[str, nn.Module]] = {}
    for kind in (GradientCheckpointingLayer, None):
        taken: list[str] = []
        for name, m in named:
            if any(name.startswith(t + ".") for t in taken):
                continue
            if (kind is not None and isinstance(m, kind)) or (kind is None and _in_module_list(model, name)):
                taken.append(name)
                out.setdefault(id(m), (name, m))
        if out:
            return out
    return out


def _in_module_list(model: nn.Module, name: str) -> bool:
    parent, _, last = name.rpartition(".")
    if not last.isdigit():
        return False
    try:
        return isinstance(model.get_submodule(parent), nn.ModuleList)
    except AttributeError:
        return False


def probe_inputs(model: nn.Module, decoder_ids: bool = True) -> dict:
    """A batch of one: 3 encoder (or decoder-only) tokens, 2 decoder tokens (``decoder_ids``: else the model
    builds its decoder inputs from ``input_ids``), no cache."""
    emb = model.get_input_embeddings()
    vocab = int(getattr(emb, "num_embeddings", 0) or getattr(model.config, "vocab_size", 8) or 8)
    ids = torch.arange(3, device=_device(model)).remainder(max(vocab - 1, 1)).add(1).clamp_max(vocab - 1)
    kwargs = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    params = inspect.signature(model.forward).parameters
    if decoder_ids and getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        kwargs["decoder_input_ids"] = ids[None, :2]
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _probe(model: nn.Module, kwarg: str, inner: str, extra_hosts: dict[int, tuple[str, nn.Module]]):
    rec = _Recorder(kwarg, inner)
    hosts = {**candidate_hosts(model), **extra_hosts}
    handles = []

    def pre(m, args, kwargs):
        n = rec.host_counts.get(id(m), 0)
        rec.host_counts[id(m)] = n + 1
        rec.host_stack.append((m, n))
        if accepts_var_kwargs(m.forward):
            return args, {**kwargs, kwarg: (id(m), n)}  # an inner host's token replaces an outer one's
        return None

    def post(m, args, output):
        if rec.host_stack and rec.host_stack[-1][0] is m:
            rec.host_stack.pop()

    for _, m in hosts.values():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, always_call=True))
    reset = _PROBE.set(rec)
    try:
        yield rec, hosts
    finally:
        _PROBE.reset(reset)
        for h in handles:
            h.remove()


def discover(model: nn.Module, kwarg: str, inner: str) -> Layout:
    """Run the probe forward and build the :class:`Layout` (ValueError when nothing can take prompts).

    ``kwarg``: the keyword the hosts pass prompts in; ``inner``: the implementation (``eager``/``sdpa``)
    the probe's attention calls run through. A self-attention module whose layer does not pass its
    keyword arguments on becomes its own host (a second probe checks that it passes them to the
    attention call); such a site cannot be recomputed under gradient checkpointing (``Layout``
    records it in ``module_hosts``).
    """
    name_of = {id(m): n for n, m in model.named_modules()}
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    encoder = None
    if enc_dec and hasattr(model, "get_encoder"):
        with contextlib.suppress(Exception):
            encoder = model.get_encoder()
    encoder_ids = {id(m) for m in encoder.modules()} if isinstance(encoder, nn.Module) else set()
    calls, hosts, same = _run_probe(model, kwarg, inner, {})

    def is_self(c: _Call) -> bool:
        return _is_self(c, same, enc_dec and id(c.module) not in encoder_ids)

    lost = {
        id(c.module): (name_of.get(id(c.module), "?"), c.module)
        for c in calls
        if is_self(c) and not _arrived(c, hosts)
    }
    if lost:
        calls, hosts, same = _run_probe(model, kwarg, inner, lost)
    return _layout(model, calls, hosts, name_of, set(lost), is_self, encoder_ids)


def _is_self(call: _Call, same_lengths: bool = False, in_decoder: bool = False) -> bool:
    """Self-attention: queries and keys of the same length (the probe gives an encoder-decoder's
    decoder fewer tokens than its encoder). Where both had to be equal, a decoder's non-causal
    attention is its cross-attention (every encoder-decoder's decoder self-attention is causal)."""
    if call.query[2] != call.key[2] or getattr(call.module, "is_cross_attention", False):
        return False
    if same_lengths and in_decoder:
        flag = call.kwargs.get("is_causal")
        return bool(getattr(call.module, "is_causal", False) if flag is None else flag)
    return True


def _host_of(call: _Call, hosts) -> tuple[nn.Module, int] | None:
    """The innermost host call around ``call`` (the one whose token the attention would receive)."""
    return next(((m, n) for m, n in reversed(call.hosts) if id(m) in hosts), None)


def _arrived(call: _Call, hosts) -> bool:
    host = _host_of(call, hosts)
    return host is not None and call.token == (id(host[0]), host[1])


def _run_probe(model, kwarg, inner, extra_hosts):
    with _probe(model, kwarg, inner, extra_hosts) as (rec, hosts), torch.no_grad():
        try:
            model(**probe_inputs(model))
        except Exception as exc:
            if not getattr(model.config, "is_encoder_decoder", False):
                raise ValueError(
                    f"prompt_kernels could not run a probe forward of {type(model).__name__} "
                    f"(input_ids only): {type(exc).__name__}: {exc}"
                ) from exc
            # Encoder-decoders whose head reads the decoder at the input's positions (sequence
            # classification) need decoder inputs as long as the encoder's: let the model build them.
            rec.calls.clear()
            rec.host_counts.clear()
            rec.host_stack.clear()
            rec.same_lengths = True
            model(**probe_inputs(model, decoder_ids=False))
    if not rec.calls:
        raise NoAttentionInterface(
            f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}) never calls "
            "transformers' attention interface (ALL_ATTENTION_FUNCTIONS): its modeling file computes attention "
            "itself, so prompt_kernels cannot route prompts into it"
        )
    return rec.calls, hosts, rec.same_lengths


def _layout(model, calls, hosts, name_of, module_hosts: set[int], is_self, encoder_ids: set[int]) -> Layout:
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    sites: list[AttentionSite] = []
    unprompted: list[nn.Module] = []
    for call in calls:
        q, k, v = call.query, call.key, call.value
        if not is_self(call):
            if not any(call.module is m for m in unprompted):
                unprompted.append(call.module)
            continue
        if not _arrived(call, hosts):
            host = _host_of(call, hosts)
            where = "no layer around it" if host is None else f"its host {name_of.get(id(host[0]))}"
            raise ValueError(
                f"{type(model).__name__}: the attention module {name_of.get(id(call.module))} does not pass "
                f"its keyword arguments to the attention function ({where}), so prompts cannot reach it"
            )
        host = _host_of(call, hosts)
        flag = call.kwargs.get("is_causal")
        causal = bool(getattr(call.module, "is_causal", False) if flag is None else flag)
        extras = frozenset(
            k for k in ("softcap", "sinks", "s_aux", "position_bias") if call.kwargs.get(k) is not None
        )
        stack = MODEL if not enc_dec else (ENCODER if id(call.module) in encoder_ids else DECODER)
        sites.append(
            AttentionSite(
                index=len(sites),
                name=name_of.get(id(call.module), "?"),
                module=call.module,
                host=host[0],
                host_name=name_of.get(id(host[0]), "?"),
                host_call=host[1],
                stack=stack,
                num_heads=int(q[1]),
                num_kv_heads=int(k[1]),
                key_dim=int(k[3]),
                value_dim=int(v[3]),
                causal=causal,
                scaling=call.kwargs.get("scaling"),
                extras=extras,
            )
        )
    if not sites:
        # Only cross-attention calls the interface (an encoder with attention code of its own): the cache
        # route may still reach the decoder's self-attention.
        raise NoAttentionInterface(
            f"{type(model).__name__} has no self-attention that goes through the attention interface"
        )
    unprompted = [m for m in unprompted if not any(m is s.module for s in sites)]
    return Layout(sites, unprompted, enc_dec, module_hosts=any(id(s.host) in module_hosts for s in sites))


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword ``model.forward`` takes its key/value cache under, or None."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def cache_target(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """``(keyword, module)``: where a key/value cache of prompts enters the model. ``module`` None: the
    model's own forward names the keyword. Else the outermost module below it that does, and that holds
    every module taking a cache (the base model of a BERT-era classification head, which calls it
    without any cache; TAPAS's encoder, whose base model takes none): the cache is handed to that
    module's forward. ``(None, None)`` when none does."""
    kw = cache_keyword(model)
    if kw is not None:
        return kw, None
    takers = {}
    for name, m in model.named_modules():
        if m is model:
            continue
        try:
            found = cache_keyword(m)
        except (TypeError, ValueError):
            continue
        if found is not None:
            takers[name] = (found, m)
    if not takers:
        return None, None
    outer = min(takers, key=lambda n: n.count("."))
    if all(n == outer or n.startswith(outer + ".") for n in takers):
        return takers[outer]
    return None, None


def position_modules(model: nn.Module) -> list[nn.Module]:
    """The embedding modules whose forward counts positions from a ``cache_length`` argument (token and
    positional embeddings; not the stacks and layers, which take the cache itself)."""
    out = []
    for m in model.modules():
        if m is model:
            continue
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            continue
        if "cache_length" in params and not any(k in params for k in ("cache", "past_key_values")):
            out.append(m)
    return out


def _with_cache(model, module, kw, cache, inputs: dict):
    """``model(**inputs)`` with ``cache`` given under ``kw`` to the model itself or, by a pre-hook for
    this call only, to ``module`` (see :func:`cache_target`)."""
    if module is None:
        return model(**inputs, **{kw: cache})
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, kw: cache}), with_kwargs=True
    )
    try:
        return model(**inputs)
    finally:
        handle.remove()


def discover_cache(model: nn.Module, reason: str) -> Layout:
    """The cache route for a model that does not use the attention interface (``reason``).

    A probe forward with ``use_cache=True``: the cache it returns gives the layers and their key/value
    shapes, and a multi-token forward on top of it checks the route. Encoders that read a cache but
    return none (classification heads of BERT-era models, whose base model takes a cache the head does
    not pass on: it is handed to the module :func:`cache_target` finds) get the shapes of their text config's standard fields
    instead (as PEFT takes them), checked by a forward whose output must change with a cache of random
    prompts. Prefix prompts then travel as a pre-filled cache (the route PEFT takes for every model):
    gate 1 only, positions and masks of the model's own cache handling. ValueError with ``reason`` if
    none of this works."""
    from transformers.cache_utils import Cache

    params = inspect.signature(model.forward).parameters
    kw, module = cache_target(model)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    if kw is None:
        raise ValueError(reason)
    inputs = probe_inputs(model)
    cache, wrap, layers = None, "dynamic", []
    if enc_dec:  # the prompts go to the decoder's self-attention cache only (as PEFT does)
        return _encoder_decoder_cache_layout(model, kw, module, reason)
    if "use_cache" in params:
        inputs["use_cache"] = True
        try:
            with torch.no_grad():
                out = model(**inputs)
        except Exception as exc:
            raise ValueError(f"{reason}; its forward with use_cache=True failed: {exc}") from exc
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        if isinstance(getattr(cache, "self_attention_cache", None), Cache):  # BERT-style decoders
            cache, wrap = cache.self_attention_cache, "encoder_decoder"
        if isinstance(cache, Cache):
            for layer in getattr(cache, "layers", []):
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                if not (torch.is_tensor(k) and torch.is_tensor(v) and k.dim() == 4 and v.dim() == 4):
                    raise ValueError(f"{reason}; its key/value cache is not laid out [B, heads, T, head_dim]")
                layers.append((tuple(k.shape), tuple(v.shape)))
        if layers and any(k[2] != 3 for k, _ in layers):
            raise ValueError(f"{reason}; its key/value cache is not one entry per token")
    # A model that writes a cache is a decoder; one that only reads it is causal only if its config says so.
    causal = bool(layers) or bool(getattr(model.config, "is_decoder", False))
    if layers:
        _check_cache_route(model, inputs, kw, module, out_cache(out), reason, must_change=False)
    else:
        layers = _config_cache_shapes(model, reason)
        _check_cache_route(model, inputs, kw, module, _random_cache(layers), reason, must_change=True)
    heads = int(getattr(model.config.get_text_config(), "num_attention_heads", 0) or layers[0][0][1])
    sites = _cache_sites(layers, heads, MODEL, causal, "cache layer")
    return Layout(
        sites,
        kind="cache",
        cache_kwarg=kw,
        cache_wrap=wrap,
        cache_module=module,
        position_modules=position_modules(model),
    )


def out_cache(out):
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


def _config_cache_shapes(model: nn.Module, reason: str) -> list[tuple[tuple, tuple]]:
    cfg = model.config.get_text_config()
    L, H, d = (getattr(cfg, n, None) for n in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    if not all(isinstance(x, int) and x > 0 for x in (L, H, d)):
        raise ValueError(
            f"{reason}; it returns no key/value cache and its config does not give its layers' shapes"
        )
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    Dh = getattr(cfg, "head_dim", None) or d // H
    return [((1, Hkv, 3, Dh), (1, Hkv, 3, Dh))] * L


def _random_cache(layers):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(torch.randn(k), torch.randn(v), i)
    return cache


def _check_cache_route(model, inputs, kw, module, cache, reason, must_change: bool) -> None:
    """A forward of 3 tokens behind a cache of 3: it must run (and, for a cache the model did not write
    itself, change the output)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    try:
        with torch.no_grad():
            given = {"input_ids": ids, "attention_mask": torch.ones_like(mask).repeat(1, 2)}
            out = _with_cache(model, module, kw, cache, given)
            if must_change:
                plain = model(input_ids=ids, attention_mask=mask)
    except Exception as exc:
        raise ValueError(
            f"{reason}; it does not take a key/value cache in front of several new tokens: {exc}"
        ) from exc
    if must_change:
        a, b = (
            out[0] if isinstance(out, tuple) else out.logits,
            plain[0] if isinstance(plain, tuple) else plain.logits,
        )
        if torch.equal(a, b):
            raise ValueError(f"{reason}; it ignores a key/value cache given to it")


def _encoder_decoder_cache_layout(model, kw, module, reason) -> Layout:
    """The decoder's self-attention cache of an encoder-decoder: decoder inputs of their own, or (heads
    that read the decoder at the input's positions, sequence classification) built by the model."""
    from transformers import DynamicCache, EncoderDecoderCache

    failure = None
    for decoder_ids in (True, False):
        inputs = probe_inputs(model, decoder_ids=decoder_ids)
        if decoder_ids and "decoder_input_ids" not in inputs:
            continue
        n = inputs["decoder_input_ids" if decoder_ids else "input_ids"].shape[1]  # decoder tokens
        inputs["use_cache"] = True
        try:
            with torch.no_grad():
                out = model(**inputs)
                self_cache = getattr(out_cache(out), "self_attention_cache", None)
                layers = [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in self_cache.layers]
                if not layers or any(k[2] != n for k, _ in layers):
                    raise ValueError("no decoder self-attention cache of one entry per token")
                prompts = EncoderDecoderCache(_random_cache(layers), DynamicCache())
                inputs["use_cache"] = False
                prompted = _with_cache(model, module, kw, prompts, inputs)
                plain = model(**inputs)
        except Exception as exc:
            failure = failure or exc
            continue
        if torch.equal(prompted.logits, plain.logits):
            raise ValueError(f"{reason}; its decoder ignores a key/value cache given to it")
        heads = int(
            getattr(model.config.get_text_config(decoder=True), "num_attention_heads", 0) or layers[0][0][1]
        )
        sites = _cache_sites(layers, heads, DECODER, True, "decoder cache layer")
        return Layout(
            sites,
            encoder_decoder=True,
            kind="cache",
            cache_kwarg=kw,
            cache_wrap="encoder_decoder",
            cache_module=module,
            position_modules=position_modules(model),
        )
    if failure is None:
        raise ValueError(reason)
    raise ValueError(
        f"{reason}; its decoder does not take a key/value cache of prompts: {failure}"
    ) from failure


def _cache_sites(layers, heads: int, stack: str, causal: bool, name: str) -> list[AttentionSite]:
    """One site per cache layer (``layers``: ``[(key shape, value shape)]``, ``[B, Hkv, T, D]``); no module."""
    return [
        AttentionSite(
            index=i,
            name=f"{name} {i}",
            module=None,
            host=None,
            host_name="",
            host_call=0,
            stack=stack,
            num_heads=heads,
            num_kv_heads=int(k[1]),
            key_dim=int(k[3]),
            value_dim=int(v[3]),
            causal=causal,
            scaling=None,
        )
        for i, (k, v) in enumerate(layers)
    ]
