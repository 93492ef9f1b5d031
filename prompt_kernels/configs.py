"""Prompt-method configurations: JSON round-trippable dataclasses and the registry that rebuilds them.

Every config is a dataclass deriving from :class:`PromptConfig`, names its method in the class
attribute ``method`` (also the module name under ``prompt_kernels.methods``), validates its fields in
``__post_init__`` (``ValueError`` / ``TypeError`` naming the field) and is registered with
:func:`register_config`. ``config_from_dict`` rebuilds any registered config from its ``to_dict()``
output; for a method name it does not know yet it imports ``prompt_kernels.methods.<method>`` first,
so the configs of methods written elsewhere in the package (SPT, VIP, ...) load without anyone having
imported them.

Adding a method ``foo``::

    # prompt_kernels/methods/foo.py
    @register_config
    @dataclass
    class FooConfig(PromptConfig):
        method: ClassVar[str] = "foo"
        rank: int = 8

        def __post_init__(self):
            super().__post_init__()
            check_int("rank", self.rank)

    @register_method(FooConfig)
    class Foo(PromptMethod): ...
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

_CONFIGS: dict[str, type[PromptConfig]] = {}


def register_config(cls: type[PromptConfig]) -> type[PromptConfig]:
    """Class decorator: make ``cls`` loadable by :func:`config_from_dict` under ``cls.method``."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must define a class attribute `method: ClassVar[str]`")
    old = _CONFIGS.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"prompt method {name!r} is already registered by {old.__name__}")
    _CONFIGS[name] = cls
    return cls


def registered_configs() -> dict[str, type[PromptConfig]]:
    """A copy of the method name -> config class registry (only the methods imported so far)."""
    return dict(_CONFIGS)


def config_class(method: str) -> type[PromptConfig]:
    """The config class of ``method``, importing ``prompt_kernels.methods.<method>`` if needed."""
    if method not in _CONFIGS:
        if not method.isidentifier():
            raise ValueError(f"unknown prompt method {method!r}")
        try:
            importlib.import_module(f"prompt_kernels.methods.{method}")
        except ModuleNotFoundError as exc:
            if exc.name != f"prompt_kernels.methods.{method}":
                raise
    if method not in _CONFIGS:
        known = ", ".join(sorted(_CONFIGS)) or "none"
        raise ValueError(f"unknown prompt method {method!r}; registered methods: {known}")
    return _CONFIGS[method]


def config_from_dict(d: dict[str, Any]) -> PromptConfig:
    """Rebuild any registered config from ``PromptConfig.to_dict()`` output (needs the ``method`` key)."""
    if not isinstance(d, dict) or "method" not in d:
        raise ValueError("a prompt config dict needs a 'method' key naming the prompt method")
    return config_class(d["method"]).from_dict(d)


def config_from_json(s: str) -> PromptConfig:
    return config_from_dict(json.loads(s))


# Validation helpers for __post_init__ (shared by every config).
def check_int(name: str, v, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def check_float(name: str, v, low: float | None = None, high: float | None = None, *, open_low=False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if low is not None and (v < low or (open_low and v == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")


def check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def check_choice(name: str, v, choices) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")


@dataclass
class PromptConfig:
    """Fields every prompt method has.

    prompt_length: number of prompt vectors / rows / prefix keys ``p`` (>= 1).
    trainable_head: also train (and save with the prompts) the task head of the model, i.e. the
        parameters outside the backbone such as a classifier (tied weights excluded). Default False:
        only the prompt parameters train.
    attention_dropout: what prompted layers do with the model's attention-probability dropout while
        training. ``"model"`` (default) keeps it exactly: a prompted layer whose attention has
        ``dropout > 0`` attends over ``concat(prompt, keys)`` through the model's own attention
        implementation (the gate becomes a ``log(gate)`` bias on the prompt columns). ``"skip"`` always
        uses ``ops.gated_prefix_attention`` (the fused kernel, no attention dropout on prompted layers).
        Layers without prompts and evaluation are the same either way.
    """

    method: ClassVar[str] = ""
    prompt_length: int = 10
    trainable_head: bool = False
    attention_dropout: str = "model"

    def __post_init__(self):
        check_int("prompt_length", self.prompt_length)
        check_bool("trainable_head", self.trainable_head)
        check_choice("attention_dropout", self.attention_dropout, ("model", "skip"))

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptConfig:
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__} is for method {cls.method!r}, got a dict for {method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, s: str) -> PromptConfig:
        d = json.loads(s)
        return cls.from_dict(d) if cls is not PromptConfig else config_from_dict(d)


@register_config
@dataclass
class PromptTuningConfig(PromptConfig):
    """Prompt tuning (Lester et al. 2021): ``Embedding(p, d)`` prepended to the input embeddings.

    init: ``"random"`` (default; normal with the standard deviation of the model's vocabulary
        embeddings), ``"vocab"`` (``p`` rows of the input embedding module's output for uniformly
        sampled token ids) or ``"text"`` (the embedding of ``init_text`` / ``init_token_ids``, repeated
        or truncated to ``p``).
    init_text: the text for ``init="text"``; tokenised by the tokenizer passed to ``attach``
        (``attach(model, config, tokenizer=tok)``), which then records the ids in ``init_token_ids``.
    init_token_ids: token ids for ``init="text"`` (used as is, no tokenizer needed).
    """

    method: ClassVar[str] = "prompt_tuning"
    init: str = "random"
    init_text: str | None = None
    init_token_ids: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_choice("init", self.init, ("random", "vocab", "text"))
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise TypeError(f"init_text must be a str or None, got {type(self.init_text).__name__}")
        if self.init_token_ids is not None:
            if isinstance(self.init_token_ids, tuple):
                self.init_token_ids = list(self.init_token_ids)
            if not isinstance(self.init_token_ids, list) or not self.init_token_ids:
                raise ValueError("init_token_ids must be a non-empty list of ints or None")
            for t in self.init_token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"init_token_ids must hold non-negative ints, got {t!r}")
        if self.init == "text" and not self.init_text and self.init_token_ids is None:
            raise ValueError('init="text" needs init_text (plus a tokenizer at attach) or init_token_ids')


@register_config
@dataclass
class PrefixTuningConfig(PromptConfig):
    """P-tuning v2 / prefix tuning: per-layer prompt keys and values, gates fixed at 1.

    The keys/values of all layers come from ``Embedding(p, 2 * L * Hkv * Dh)`` (laid out as PEFT's:
    ``[p, L, 2, Hkv, Dh]``, index 0 = key, 1 = value), or with ``prefix_projection`` from
    ``Embedding(p, d) -> Linear(d, r) -> tanh -> Linear(r, 2 * L * Hkv * Dh)``, ``r =
    projection_hidden_size``. ``prefix_dropout`` is applied to the keys/values while training (one
    dropout mask shared by the batch).
    """

    method: ClassVar[str] = "prefix_tuning"
    prefix_projection: bool = False
    projection_hidden_size: int = 512
    prefix_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_bool("prefix_projection", self.prefix_projection)
        check_int("projection_hidden_size", self.projection_hidden_size)
        check_float("prefix_dropout", self.prefix_dropout, 0.0, 1.0)
        if self.prefix_dropout == 1.0:
            raise ValueError("prefix_dropout must be < 1")


__all__ = [
    "PrefixTuningConfig",
    "PromptConfig",
    "PromptTuningConfig",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "config_class",
    "config_from_dict",
    "config_from_json",
    "register_config",
    "registered_configs",
]
