"""The per-architecture knowledge of the patch layer, in one table.

For each supported ``config.model_type``: where the transformer layers live (relative to the
backbone, ``model.base_model``), where the self-attention module that calls transformers'
attention interface lives in a layer, its key/value projections (or GPT-2's fused ``c_attn``),
whether the model is causal, how it numbers positions, and whether the layers receive rotary
``position_embeddings``. Everything else (heads, head size, number of key/value heads) is read from
the config and the projection shapes.

Adding an architecture whose attention goes through ``ALL_ATTENTION_FUNCTIONS.get_interface`` is
usually one row (see ``python_tests/test_patch_models.py``, which runs every row on a tiny config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers: str  # dotted path from the backbone to the nn.ModuleList of layers
    attention: str  # dotted path from a layer to its self-attention module
    key: str | None = None  # dotted path from the attention module to the key projection (nn.Linear)
    value: str | None = None
    fused_qkv: str | None = None  # GPT-2: Conv1D with weight [d, 3 * d] laid out q | k | v
    key_norm: str | None = None  # per-head norm applied to keys before rotary (Qwen3)
    causal: bool | None = True  # None: read config.is_decoder (BERT-style models)
    positions: str = "arange"  # "arange" (0..T-1 after the cache) | "roberta" (padding_idx + 1 + cumsum)
    rotary: bool = False  # layers take position_embeddings=(cos, sin)
    encoder_decoder: str = "decoder"  # for the README table: "encoder" | "decoder"

    def is_causal(self, config) -> bool:
        if self.causal is None:
            return bool(getattr(config, "is_decoder", False))
        return self.causal

    def first_position(self, config) -> int:
        """Position id of the first real token (also given to input-style prompt vectors)."""
        if self.positions == "roberta":
            return int(config.pad_token_id) + 1
        return 0


_BERT_LIKE = dict(
    layers="encoder.layer",
    attention="attention.self",
    key="key",
    value="value",
    causal=None,
    encoder_decoder="encoder",
)
_LLAMA_LIKE = dict(layers="layers", attention="self_attn", key="k_proj", value="v_proj", rotary=True)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("bert", ("bert",), **_BERT_LIKE),
    Architecture("roberta", ("roberta", "xlm-roberta", "camembert"), positions="roberta", **_BERT_LIKE),
    Architecture("electra", ("electra",), **_BERT_LIKE),
    Architecture(
        "distilbert",
        ("distilbert",),
        layers="transformer.layer",
        attention="attention",
        key="k_lin",
        value="v_lin",
        causal=False,
        encoder_decoder="encoder",
    ),
    Architecture("gpt2", ("gpt2",), layers="h", attention="attn", fused_qkv="c_attn"),
    Architecture("llama", ("llama",), **_LLAMA_LIKE),
    Architecture("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Architecture("qwen3", ("qwen3",), key_norm="k_norm", **_LLAMA_LIKE),
    Architecture("mistral", ("mistral",), **_LLAMA_LIKE),
    Architecture("gemma", ("gemma",), **_LLAMA_LIKE),
)

_BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def resolve(model: nn.Module) -> Architecture:
    """The table row for ``model`` (a transformers PreTrainedModel); ValueError if unsupported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise ValueError(
            f"prompt_kernels does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    backbone = model.base_model
    try:
        layers = get_module(backbone, arch.layers)
        get_module(layers[0], arch.attention)
    except (AttributeError, IndexError, TypeError) as exc:
        raise ValueError(
            f"{type(model).__name__}: the module layout differs from what prompt_kernels expects for "
            f"{arch.name} ({arch.layers}[i].{arch.attention}): {exc}"
        ) from exc
    return arch


def layer_modules(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    return list(get_module(model.base_model, arch.layers))


def attention_module(layer: nn.Module, arch: Architecture) -> nn.Module:
    return get_module(layer, arch.attention)


def project_key_value(
    attn: nn.Module, arch: Architecture, hidden: torch.Tensor, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen key/value projections of one layer applied to hidden-space prompts.

    hidden ``[b, p, d]`` -> key, value ``[b, Hkv, p, Dh]`` (no rotary position on the keys).
    """
    b, p, _ = hidden.shape
    if arch.fused_qkv is not None:
        conv = get_module(attn, arch.fused_qkv)  # Conv1D: y = x @ weight + bias, weight [d, 3 * d_attn]
        w, bias = conv.weight, conv.bias
        n = num_kv_heads * head_dim
        x = hidden.to(w.dtype)
        k = torch.addmm(bias[n : 2 * n], x.reshape(b * p, -1), w[:, n : 2 * n]).view(b, p, -1)
        v = torch.addmm(bias[2 * n : 3 * n], x.reshape(b * p, -1), w[:, 2 * n : 3 * n]).view(b, p, -1)
    else:
        kp, vp = get_module(attn, arch.key), get_module(attn, arch.value)
        x = hidden.to(kp.weight.dtype)
        k, v = kp(x), vp(x)
    k = k.view(b, p, num_kv_heads, head_dim)
    v = v.view(b, p, num_kv_heads, head_dim)
    if arch.key_norm is not None:
        k = get_module(attn, arch.key_norm)(k)
    return k.transpose(1, 2), v.transpose(1, 2)


def default_position_ids(
    arch: Architecture, config, input_ids: torch.Tensor | None, length: int, past: int, device
) -> torch.Tensor:
    """The position ids ``[B or 1, T]`` the model would give its tokens by itself (after ``past`` cached ones)."""
    if arch.positions == "roberta":
        pad = int(config.pad_token_id)
        if input_ids is not None:
            mask = input_ids.ne(pad).int()
            return ((torch.cumsum(mask, dim=1) + past) * mask).long() + pad
        return torch.arange(pad + 1, pad + 1 + length, device=device).unsqueeze(0)
    return torch.arange(past, past + length, device=device).unsqueeze(0)
