"""Hidden-space prompts through an attention module's own frozen key/value projections.

Found by the names transformers' modeling files use (separate ``k_proj``/``v_proj``-style linears,
or a fused ``q | k | v`` projection), with the key norm where the module has one (per head, or over
the whole projection). Modules
whose keys are built otherwise (multi-head latent attention, interleaved fused projections) have no
projection here: methods that need hidden-space prompts raise a ValueError naming the module there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_SEPARATE = (("k_proj", "v_proj"), ("key", "value"), ("k", "v"), ("k_lin", "v_lin"), ("wk", "wv"))
_FUSED_QKV = ("c_attn", "qkv_proj", "Wqkv", "W_pack")  # output laid out q | k | v
_KEY_NORMS = ("k_norm", "k_layernorm", "key_norm")


def _weight_out_in(m: nn.Module) -> torch.Tensor | None:
    """The module's weight as ``[out, in]`` (``nn.Linear``) or None; GPT-2's Conv1D stores ``[in, out]``."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return w.t() if type(m).__name__ == "Conv1D" else w


def find_projection(
    attn: nn.Module, hidden_size: int, num_kv_heads: int, key_dim: int, value_dim: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """A function ``hidden [b, p, d] -> (key [b, Hkv, p, Dk], value [b, Hkv, p, Dv])`` or None."""
    nk, nv = num_kv_heads * key_dim, num_kv_heads * value_dim
    norm = next((getattr(attn, n) for n in _KEY_NORMS if isinstance(getattr(attn, n, None), nn.Module)), None)

    def heads(x: torch.Tensor, dim: int) -> torch.Tensor:
        b, p, _ = x.shape
        return x.view(b, p, num_kv_heads, dim)

    # A key norm over the whole projection (OLMo 2 and 3, MiniMax-M2: RMSNorm of Hkv * Dk before the
    # split into heads) or per head (Qwen3, Gemma 3: of Dk after it), told apart by its weight's size.
    weight = getattr(norm, "weight", None)
    full_width = norm is not None and isinstance(weight, torch.Tensor) and weight.numel() == nk != key_dim

    def finish(k, v):
        if full_width:
            k = norm(k)
        k = heads(k, key_dim)
        if norm is not None and not full_width:
            k = norm(k)
        return k.transpose(1, 2), heads(v, value_dim).transpose(1, 2)

    for kn, vn in _SEPARATE:
        kp, vp = getattr(attn, kn, None), getattr(attn, vn, None)
        wk, wv = (
            (_weight_out_in(kp), _weight_out_in(vp)) if kp is not None and vp is not None else (None, None)
        )
        if wk is None or wv is None:
            continue
        if tuple(wk.shape) == (nk, hidden_size) and tuple(wv.shape) == (nv, hidden_size):
            return lambda h, kp=kp, vp=vp: finish(kp(h.to(kp.weight.dtype)), vp(h.to(vp.weight.dtype)))
    for fn in _FUSED_QKV:
        m = getattr(attn, fn, None)
        w = _weight_out_in(m) if m is not None else None
        if w is None or w.shape[1] != hidden_size or w.shape[0] <= nk + nv:
            continue
        nq = w.shape[0] - nk - nv

        def fused(h, m=m, nq=nq):
            y = m(h.to(m.weight.dtype))
            return finish(y[..., nq : nq + nk], y[..., nq + nk :])

        return fused
    return None
