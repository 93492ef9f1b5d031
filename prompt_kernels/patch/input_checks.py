"""What input-style prompts (rows in front of the input embeddings) need from a model and from a call,
checked where ``attach`` or a forward would otherwise fail inside the model or give a wrong answer."""

from __future__ import annotations

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig
from prompt_kernels.methods.base import PromptMethod, method_class


def refuse_layer_prompts(config: PromptConfig, model: nn.Module, reason: str) -> None:
    """On a model whose layers no prompt can reach, only input-style methods (prompts prepended to the
    input embeddings) run: ValueError for a method that puts prompts into the layers."""
    cls = method_class(config)
    if cls.prefix is not PromptMethod.prefix or cls.sequence_layer is not None:
        raise ValueError(
            f"{type(config).__name__} puts prompts into the model's layers, which prompt_kernels cannot reach "
            f"in {type(model).__name__}: {reason}. Methods that only prepend prompts to the input embeddings "
            "(prompt tuning, VIP, InfoPrompt) work on it."
        )


def embeddings_seq_first(model: nn.Module, embeddings: nn.Module) -> bool:
    """Whether ``model`` looks its ``[B, T]`` ids up transposed (``[T, B]``): one no-grad probe forward of
    a batch of one with three tokens (False when the probe does not run)."""
    from prompt_kernels.patch.discovery import probe_inputs

    shapes = []
    handle = embeddings.register_forward_hook(
        lambda m, args, out: shapes.append(tuple(args[0].shape) if args else ())
    )
    try:
        with torch.no_grad():
            model(**probe_inputs(model))
    except Exception:
        return False
    finally:
        handle.remove()
    return bool(shapes) and shapes[0] == (3, 1)


# Per-token arguments input-style prompts extend (the rest of a [B, T, ...] tensor's kind is unknown).
_PER_TOKEN_KNOWN = frozenset(
    {
        "input_ids",
        "inputs_embeds",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "labels",
        "cache_position",
    }
)


def refuse_other_per_token_inputs(
    kwargs: dict, B: int, T: int, encoder_decoder: bool, generating: bool
) -> None:
    """NotImplementedError for a per-token argument ``[B, T, ...]`` input-style prompts would need rows
    of but prompt_kernels cannot fill (XLM's ``langs``, XLNet's ``perm_mask``, LayoutLM's ``bbox``)."""
    for name, value in kwargs.items():
        if (
            name in _PER_TOKEN_KNOWN
            or (encoder_decoder and name.startswith("decoder_"))
            or name.startswith("encoder_")  # another sequence's (cross-attention inputs)
            or not torch.is_tensor(value)
            or not 2 <= value.dim() <= 3  # not images or video ([B, C, H, W, ...])
            or tuple(value.shape[:2]) != (B, T)
        ):
            continue
        what = (
            "generate() with input-style prompts is not supported on this model (its generate passes it)"
            if generating
            else f"call without {name!r}"
        )
        raise NotImplementedError(
            f"input-style prompts put rows in front of the {T} tokens, and the per-token argument {name!r} "
            f"{list(value.shape)} would need entries for them too, which prompt_kernels cannot choose: {what}"
        )
