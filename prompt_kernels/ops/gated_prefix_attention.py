"""Attention over P gated prompt keys/values and S ordinary keys/values.

    query:        [B, H, T, Dh]
    key, value:   [B, Hkv, S, Dh]          (H % Hkv == 0: grouped-query attention)
    prompt_key,
    prompt_value: [B or 1, Hkv, P, Dh]     (P may be 0)
    gate:         broadcastable to [B, H], values in [0, 1]
    attention_mask: None | bool [B, S] (True = attend) | additive float [B, 1 or H, T, S]
    -> out:       [B, H, T, Dh]

Softmax over the P + S scores ``scale * q.k`` where each prompt key's weight is multiplied by
``gate`` before normalisation (its logit gets ``+ log(gate)``). With ``is_causal`` query ``t`` sees
every prompt key and the keys ``0 .. t + S - T`` (bottom-right alignment). A query row with no
visible key and no weight on the prompt gives zeros.
"""

from __future__ import annotations

import torch

from prompt_kernels import _validate


def _check(query, key, value, prompt_key, prompt_value, gate, attention_mask, scale, dtypes=_validate.FLOAT_DTYPES):
    for name, t in (("query", query), ("key", key), ("value", value), ("prompt_key", prompt_key), ("prompt_value", prompt_value)):
        _validate.tensor(name, t, ndim=4, dtypes=dtypes)
    _validate.same_dtype("query", query, key=key, value=value, prompt_key=prompt_key, prompt_value=prompt_value)
    _validate.same_device(
        "query", query, key=key, value=value, prompt_key=prompt_key, prompt_value=prompt_value, gate=gate,
        attention_mask=attention_mask,
    )
    B, H, T, Dh = query.shape
    if key.shape[0] != B or key.shape[3] != Dh:
        raise ValueError(f"key must have shape [B={B}, Hkv, S, Dh={Dh}], got {tuple(key.shape)}")
    Hkv, S = key.shape[1], key.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key heads Hkv={Hkv}")
    if value.shape != key.shape:
        raise ValueError(f"value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
    P = prompt_key.shape[2]
    if prompt_key.shape[0] not in (1, B) or prompt_key.shape[1] != Hkv or prompt_key.shape[3] != Dh:
        raise ValueError(
            f"prompt_key must have shape [B={B} or 1, Hkv={Hkv}, P, Dh={Dh}], got {tuple(prompt_key.shape)}"
        )
    if prompt_value.shape != prompt_key.shape:
        raise ValueError(
            f"prompt_value must have the shape of prompt_key {tuple(prompt_key.shape)}, got {tuple(prompt_value.shape)}"
        )
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a torch.Tensor broadcastable to [B, H], got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    if gate.dim() > 2 or any(g not in (1, n) for g, n in zip(gate.shape[::-1], (H, B))):
        raise ValueError(f"gate must be broadcastable to [B={B}, H={H}], got shape {tuple(gate.shape)}")
    if not torch.compiler.is_compiling() and gate.numel() and ((gate < 0).any() or (gate > 1).any()):
        raise ValueError("gate values must lie in [0, 1]")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.dtype == torch.bool:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"a bool attention_mask must have shape [B={B}, S={S}], got {tuple(attention_mask.shape)}")
        elif attention_mask.is_floating_point():
            if (
                attention_mask.dim() != 4
                or attention_mask.shape[0] != B
                or attention_mask.shape[1] not in (1, H)
                or tuple(attention_mask.shape[2:]) != (T, S)
            ):
                raise ValueError(
                    f"an additive attention_mask must have shape [B={B}, 1 or H={H}, T={T}, S={S}], "
                    f"got {tuple(attention_mask.shape)}"
                )
        else:
            raise TypeError(f"attention_mask must be bool (key padding) or floating point (additive), got {attention_mask.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return B, H, T, Dh, Hkv, S, P


def gated_prefix_attention_reference(
    query, key, value, prompt_key, prompt_value, gate, attention_mask=None, is_causal=False, scale=None
):
    """Plain-PyTorch specification (concatenate, gate the prompt weights, softmax, matmul).

    The gate multiplies the prompt keys' unnormalised weights, which is ``+ log(gate)`` on their
    logits but stays differentiable at ``gate = 0``.
    """
    B, H, T, Dh, Hkv, S, P = _check(
        query, key, value, prompt_key, prompt_value, gate, attention_mask, scale, _validate.REFERENCE_DTYPES
    )
    scale = Dh**-0.5 if scale is None else float(scale)
    rep = H // Hkv
    k = torch.cat([prompt_key.expand(B, -1, -1, -1), key], dim=2).repeat_interleave(rep, dim=1)
    v = torch.cat([prompt_value.expand(B, -1, -1, -1), value], dim=2).repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, k.transpose(-1, -2)) * scale  # [B, H, T, P + S]
    bias = torch.zeros(B, H, T, S, dtype=scores.dtype, device=scores.device)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
        else:
            bias = bias + attention_mask.to(scores.dtype)
    if is_causal:
        t = torch.arange(T, device=scores.device)[:, None]
        s = torch.arange(S, device=scores.device)[None, :]
        bias = bias.masked_fill(s > t + S - T, float("-inf"))
    scores = torch.cat([scores[..., :P], scores[..., P:] + bias], dim=-1)
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(scores - m)
    g = gate.to(scores.dtype).expand(B, H)[:, :, None, None]
    w = torch.cat([w[..., :P] * g, w[..., P:]], dim=-1)
    z = w.sum(dim=-1, keepdim=True)
    num = torch.matmul(w, v)
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    return torch.where(z > 0, num / safe_z, torch.zeros_like(num)).to(query.dtype)


def gated_prefix_attention(
    query, key, value, prompt_key, prompt_value, gate, attention_mask=None, is_causal=False, scale=None
):
    """See the module docstring. Dispatches to Triton (CUDA), C++/SDPA (CPU) or the reference."""
    # Backends (Triton forward/backward, CPU path) are added by the gated-prefix-attention work;
    # until then every call runs the reference.
    return gated_prefix_attention_reference(
        query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale
    )
