"""Sequence style: masks and rotary tables for ``p`` prompt rows inserted in front of the hidden states."""

from __future__ import annotations

import torch


def extend_mask(mask: torch.Tensor | None, p: int, causal: bool) -> torch.Tensor | None:
    """A layer's 4D mask ``[B, 1|H, T, S]`` (bool True = attend, or additive float) -> ``[B, 1|H, p + T, p + S]``.

    Every query sees the ``p`` rows. The rows see each other and, in an encoder, the real keys that
    some query may attend (padding stays hidden); in a causal model they see only the rows (they come
    before every token). None stays None (no mask / ``is_causal``: the rows are the first positions).
    """
    if mask is None:
        return None
    B, H, T, S = mask.shape
    if mask.dtype == torch.bool:
        out = torch.ones(B, H, p + T, p + S, dtype=torch.bool, device=mask.device)
        out[:, :, p:, p:] = mask
        if causal:
            out[:, :, :p, p:] = False
        else:
            out[:, :, :p, p:] = mask.any(dim=2, keepdim=True)
        return out
    low = torch.finfo(mask.dtype).min
    out = torch.zeros(B, H, p + T, p + S, dtype=mask.dtype, device=mask.device)
    out[:, :, p:, p:] = mask
    if causal:
        out[:, :, :p, p:] = low
    else:
        valid = (mask > low / 2).any(dim=2, keepdim=True)
        out[:, :, :p, p:] = torch.where(valid, torch.zeros((), dtype=mask.dtype, device=mask.device), low)
    return out


def extend_rotary(position_embeddings, p: int):
    """``(cos, sin)`` each ``[B|1, T, Dh]`` -> ``[B|1, p + T, Dh]``: the rows get no rotation (cos 1, sin 0)."""
    cos, sin = position_embeddings
    pad = (cos.shape[0], p, cos.shape[-1])
    return (
        torch.cat([torch.ones(pad, dtype=cos.dtype, device=cos.device), cos], dim=1),
        torch.cat([torch.zeros(pad, dtype=sin.dtype, device=sin.device), sin], dim=1),
    )
