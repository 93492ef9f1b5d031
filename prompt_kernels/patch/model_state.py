"""What ``attach`` changes on the model it is given, and how ``detach`` (or a failed ``attach``) puts it
back: the model's private config copies and instance flags set on its modules."""

from __future__ import annotations

import copy
import inspect

from torch import nn


def param_index(fn, name: str) -> int | None:
    """Position of parameter ``name`` among the positional parameters of ``fn`` (bound method)."""
    for i, prm in enumerate(inspect.signature(fn).parameters.values()):
        if prm.kind not in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
            return None
        if prm.name == name:
            return i
    return None


def isolate_configs(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Give ``model`` (and each of its modules holding a config) a private deep copy of its config.

    Returns ``[(module, original config)]`` for :func:`restore_configs`. Sub-configs keep their
    identity relations (one ``deepcopy`` memo), so a layer holding ``config.text_config`` gets the
    copy's ``text_config``.
    """
    from transformers import PretrainedConfig

    memo: dict[int, object] = {}
    top = copy.deepcopy(model.config, memo)
    swaps = []
    for m in model.modules():
        cfg = m.__dict__.get("config")
        if isinstance(cfg, PretrainedConfig):
            new = top if cfg is model.config else memo.get(id(cfg))
            if new is None:
                new = memo[id(cfg)] = copy.deepcopy(cfg, memo)
            m.__dict__["config"] = new
            swaps.append((m, cfg))
    return swaps


def restore_configs(swaps) -> None:
    for m, cfg in swaps:
        m.__dict__["config"] = cfg


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_flags(modules: list[nn.Module], name: str, value) -> list:
    """Sets instance attribute ``name`` on each module; returns what ``restore_flags`` needs."""
    saved = [(m, name, m.__dict__.get(name, _MISSING)) for m in modules]
    for m in modules:
        setattr(m, name, value)
    return saved


def restore_flags(saved: list) -> None:
    for m, name, old in saved:
        if old is _MISSING:
            m.__dict__.pop(name, None)
        else:
            setattr(m, name, old)


_MISSING = object()
