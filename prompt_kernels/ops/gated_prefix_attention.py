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

Backends (chosen per call by ``prompt_kernels._backend.select``; this op has no C++ kernel):
  * ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): the FlashAttention-2
    style kernels of ``prompt_kernels.kernels.gated_prefix_attention``, never concatenating.
  * ``torch`` on CPU: forward on the prompt and keys concatenated ([B, Hkv, P + S, Dh], one copy
    each) with the gate and the masks folded into one additive bias (``log gate`` on the prompt
    columns, broadcast dimensions kept at size 1) through ATen's fused CPU flash attention; backward
    through ATen's fused backward on the keys plus small matmuls for the prompt (float32) or batched
    GEMMs (fp16/bf16); dgate from the saved log-sum-exp (see :func:`cpu_backward`). Compared with the
    reference and with autograd through ``scaled_dot_product_attention`` on the concatenation in
    benchmarks/notes/gated_prefix_attention.md.
  * ``torch`` on other devices (CUDA without Triton): the reference, differentiated by autograd.

Both custom ops share one convention for the saved ``lse`` [B, H, T] (float32, natural log of the
row's total weight, ``+inf`` on rows with no weight), so a backward may run on another backend than
its forward.
"""

from __future__ import annotations

import torch

from prompt_kernels import _backend, _validate

OP = "gated_prefix_attention"


def _check(
    query, key, value, prompt_key, prompt_value, gate, attention_mask, scale, dtypes=_validate.FLOAT_DTYPES
):
    for name, t in (
        ("query", query),
        ("key", key),
        ("value", value),
        ("prompt_key", prompt_key),
        ("prompt_value", prompt_value),
    ):
        _validate.tensor(name, t, ndim=4, dtypes=dtypes)
    _validate.same_dtype(
        "query", query, key=key, value=value, prompt_key=prompt_key, prompt_value=prompt_value
    )
    # Type checks before the device check, which reads .device.
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a torch.Tensor broadcastable to [B, H], got {type(gate).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    _validate.same_device(
        "query",
        query,
        key=key,
        value=value,
        prompt_key=prompt_key,
        prompt_value=prompt_value,
        gate=gate,
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
            raise TypeError(
                f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
            )
        if attention_mask.dtype == torch.bool:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(
                    f"a bool attention_mask must have shape [B={B}, S={S}], got {tuple(attention_mask.shape)}"
                )
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
            raise TypeError(
                f"attention_mask must be bool (key padding) or floating point (additive), got {attention_mask.dtype}"
            )
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


# ----------------------------------------------------------------------------------------------
# Floors


def visible_key_pairs(T: int, S: int, is_causal: bool) -> int:
    """Number of (query, key) pairs among the S keys that attention reads: T * S, or with bottom-right
    causality sum_t clamp(t + S - T + 1, 0, S)."""
    if not is_causal:
        return T * S
    d = S - T
    if d >= 0:
        return T * (d + 1) + T * (T - 1) // 2
    return S * (S + 1) // 2


def gated_prefix_attention_floors(
    B: int,
    H: int,
    Hkv: int,
    T: int,
    S: int,
    P: int,
    Dh: int,
    *,
    dtype: torch.dtype = torch.float32,
    prompt_batch: int = 1,
    gate_numel: int = 1,
    gate_dtype: torch.dtype = torch.float32,
    mask: str = "none",
    mask_heads: int = 1,
    is_causal: bool = False,
) -> dict[str, dict[str, int]]:
    """Byte and flop floors of one call: each input read once, each output written once.

    Forward reads q, k, v, prompt_key, prompt_value, gate and the mask (``"none"``, ``"bool"`` [B, S]
    or ``"additive"`` [B, mask_heads, T, S] in ``dtype``) and writes out plus the float32
    log-sum-exp [B, H, T] the backward needs. Flops: two matmuls (q.k and p.v), 4 * Dh per visible
    (query, key) pair, the P prompt keys always visible. Backward reads the forward's inputs, out,
    grad_out and lse, writes dq, dk, dv, dprompt_key, dprompt_value and dgate; 5 matmuls, 2.5x the
    forward's flops (the recomputation of q.k counted once).
    """
    es = torch.empty((), dtype=dtype).element_size()
    gs = torch.empty((), dtype=gate_dtype).element_size()
    q = B * H * T * Dh * es
    kv = 2 * B * Hkv * S * Dh * es
    pkv = 2 * prompt_batch * Hkv * P * Dh * es
    g = gate_numel * gs
    mask_bytes = {"none": 0, "bool": B * S, "additive": B * mask_heads * T * S * es}[mask]
    lse = B * H * T * 4
    pairs = T * P + visible_key_pairs(T, S, is_causal)
    fwd_flops = 4 * B * H * Dh * pairs
    return {
        "forward": {"bytes": q + kv + pkv + g + mask_bytes + q + lse, "flops": fwd_flops},
        "backward": {
            "bytes": (q + kv + pkv + g + mask_bytes + 2 * q + lse) + (q + kv + pkv + g),
            "flops": fwd_flops * 5 // 2,
        },
    }


# ----------------------------------------------------------------------------------------------
# CPU path: fused ATen flash attention on the concatenation, the gate as a bias


def _gate_2d(gate: torch.Tensor) -> torch.Tensor:
    """The gate as float32 [1 or B, 1 or H] (its broadcast dimensions kept at size 1)."""
    g = gate.detach().to(torch.float32)
    return g.reshape((1,) * (2 - g.dim()) + tuple(g.shape))


def _reduce_gate_grad(dgate_bh: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Sum dgate [B, H] over the dimensions the gate was broadcast along; the gate's shape and dtype."""
    shape2 = (1,) * (2 - gate.dim()) + tuple(gate.shape)
    return dgate_bh.sum_to_size(shape2).reshape(gate.shape).to(gate.dtype).contiguous()


def heads_last_empty(shape, *, dtype, device) -> torch.Tensor:
    """An uninitialised [N, heads, rows, Dh] tensor stored as [N, rows, heads, Dh]: the layout of the
    gradients of query, key and value on every backend (ATen's CPU flash attention writes it, and the
    transpose back to Hugging Face's [B, T, H, Dh] is then free)."""
    N, heads, rows, Dh = shape
    return torch.empty((N, rows, heads, Dh), dtype=dtype, device=device).transpose(1, 2)


def heads_last_strides(shape) -> tuple[int, int, int, int]:
    _, heads, rows, Dh = shape
    return (rows * heads * Dh, Dh, heads * Dh, 1)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the heads-last layout (a copy unless it already is)."""
    if t.stride() == heads_last_strides(t.shape):
        return t
    return heads_last_empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _key_bias(attention_mask, is_causal: bool, B: int, T: int, S: int, dtype, device) -> torch.Tensor | None:
    """Additive float32 bias on the S key columns, [B or 1, 1 or H, T or 1, S], or None."""
    bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(B, 1, 1, S, dtype=torch.float32, device=device)
            bias.masked_fill_(~attention_mask[:, None, None, :], float("-inf"))
        else:
            # The reference adds the mask in the query dtype: round it there first, as it does.
            bias = attention_mask.to(dtype).to(torch.float32)
    if is_causal:
        t = torch.arange(T, device=device)[:, None]
        s = torch.arange(S, device=device)[None, :]
        causal = torch.zeros(T, S, dtype=torch.float32, device=device).masked_fill_(
            s > t + S - T, float("-inf")
        )
        bias = causal[None, None] if bias is None else bias + causal
    return bias


def _cpu_operands(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal):
    """-> (keys [B, Hkv, L, Dh], values, bias [.., .., .., L] float32 or None, key bias or None, gate 2d).

    L = P + S with the prompt in front, or L = S when no prompt weight is nonzero (gate = 0 removes
    the prompt exactly, so it is left out)."""
    B, _, T, Dh = query.shape
    Hkv, S, P = key.shape[1], key.shape[2], prompt_key.shape[2]
    kb = _key_bias(attention_mask, is_causal, B, T, S, query.dtype, query.device)
    g2 = _gate_2d(gate)
    if P == 0 or not bool((g2 != 0).any()):
        return key, value, kb, kb, g2
    L = P + S
    kc = query.new_empty((B, Hkv, L, Dh))
    vc = query.new_empty((B, Hkv, L, Dh))
    kc[:, :, :P] = prompt_key
    kc[:, :, P:] = key
    vc[:, :, :P] = prompt_value
    vc[:, :, P:] = value
    if kb is None and bool((g2 == 1).all()):
        return kc, vc, None, None, g2
    kshape = kb.shape[:3] if kb is not None else (1, 1, 1)
    bias = torch.empty(
        max(kshape[0], g2.shape[0]),
        max(kshape[1], g2.shape[1]),
        kshape[2],
        L,
        dtype=torch.float32,
        device=query.device,
    )
    bias[..., :P] = torch.log(g2)[:, :, None, None]  # log(0) = -inf: those prompt weights are exactly 0
    bias[..., P:] = 0.0 if kb is None else kb
    return kc, vc, bias, kb, g2


def cpu_forward(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale):
    """-> (out [B, H, T, Dh], lse [B, H, T] float32, +inf on rows with no weight)."""
    B, H, T, _Dh = query.shape
    S, P = key.shape[2], prompt_key.shape[2]
    kc, vc, bias, kb, g2 = _cpu_operands(
        query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal
    )
    if kc.shape[2] == 0 or query.numel() == 0:  # no key at all (ATen's kernel would divide by zero)
        out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
        return out, torch.full((B, H, T), float("inf"), device=query.device)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, kc, vc, 0.0, False, attn_mask=bias, scale=scale
    )
    lse = lse.contiguous()
    # ATen gives out = 0 and lse = 0 on a row with no weight; the shared convention is lse = +inf.
    # Such rows exist only when the prompt has no weight (P = 0 is left as is: nothing reads it).
    if P > 0 and (kb is not None or S == 0):
        g_zero = g2 == 0
        if bool(g_zero.any()):
            keys_dead = (
                (kb == float("-inf")).all(dim=-1)
                if kb is not None
                else torch.ones(1, 1, 1, dtype=torch.bool, device=query.device)
            )
            dead = keys_dead & g_zero[:, :, None]
            lse = lse.masked_fill(dead.expand(B, H, T), float("inf"))
    return out.contiguous(), lse


def _dgate_from_lse(grad_out, query, prompt_key, prompt_value, out, lse, scale) -> torch.Tensor:
    """dgate [B, H] float32 = sum_t sum_j exp(s_tj - lse_t) (grad_out_t . pv_j - delta_t), with s the
    UNGATED prompt logit: equal to sum P_tj (dP_tj - delta_t) / gate, and finite at gate = 0."""
    B, H, T, Dh = query.shape
    Hkv, P = prompt_key.shape[1], prompt_key.shape[2]
    f = torch.float32
    do = grad_out.to(f)
    s = torch.matmul(query.to(f).reshape(B, Hkv, -1, Dh), prompt_key.to(f).transpose(-1, -2))
    dp = torch.matmul(do.reshape(B, Hkv, -1, Dh), prompt_value.to(f).transpose(-1, -2))
    delta = (do * out.to(f)).sum(-1, keepdim=True)  # [B, H, T, 1]
    pu = torch.exp(s.view(B, H, T, P).mul_(scale).sub_(lse[..., None]))  # lse = +inf -> 0
    return (pu * (dp.view(B, H, T, P) - delta)).sum(dim=(2, 3))


def _cpu_backward_gemm(do, query, kc, vc, out, lse, bias, scale):
    """Attention backward with batched GEMMs over [B, H, T, L] probabilities (recomputed from lse):
    faster than ATen's fused CPU kernel in fp16/bf16. -> (dq, dk, dv) of the concatenated keys."""
    B, H, T, Dh = query.shape
    Hkv, L = kc.shape[1], kc.shape[2]
    f32, dt = torch.float32, query.dtype
    q, g_do = _grouped(query, Hkv), _grouped(do, Hkv)
    p = torch.matmul(q, kc.transpose(-1, -2)).view(B, H, T, L).to(f32).mul_(scale)
    if bias is not None:
        p.add_(bias)
    p.sub_(lse[..., None]).exp_()  # lse = +inf (rows with no weight) gives 0
    ds = torch.matmul(g_do, vc.transpose(-1, -2)).view(B, H, T, L).to(f32)
    ds.sub_((do.to(f32) * out.to(f32)).sum(dim=-1, keepdim=True)).mul_(p)
    p_, ds_ = _grouped(p.to(dt), Hkv), _grouped(ds.to(dt), Hkv)
    dq = torch.matmul(ds_, kc).view(B, H, T, Dh).mul_(scale)
    dkc = torch.matmul(ds_.transpose(-1, -2), q).mul_(scale)
    dvc = torch.matmul(p_.transpose(-1, -2), g_do)
    return dq, dkc, dvc


def _grouped(t: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, H, T, X] -> [B, Hkv, (H // Hkv) * T, X]: the query heads of a kv head as one matrix."""
    return t.reshape(t.shape[0], Hkv, -1, t.shape[-1])


def cpu_backward(
    grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    """-> (dq, dk, dv, dprompt_key, dprompt_value, dgate [B, H] float32).

    float32: the S keys through ATen's fused CPU flash-attention backward directly on ``key`` and
    ``value`` (no concatenation), fed the full output and log-sum-exp, so its probabilities and
    ``delta = rowsum(grad_out * out)`` are the two-segment ones; the P prompt keys with small float32
    matmuls (:func:`_cpu_prompt_backward`). fp16/bf16: ATen's fused backward is 2-3x slower there
    than batched GEMMs (AMX / AVX-512 on this CPU), so the concatenation's backward runs as GEMMs.
    """
    dt = query.dtype
    do = grad_out.to(dt).contiguous()
    if query.numel() == 0:
        dq, dk, dv = (_heads_last(torch.zeros_like(t)) for t in (query, key, value))
        dpk, dpv = torch.zeros_like(prompt_key), torch.zeros_like(prompt_value)
        return dq, dk, dv, dpk, dpv, torch.zeros(query.shape[:2], dtype=torch.float32, device=query.device)
    if dt == torch.float32:
        return _cpu_backward_split(
            do, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
        )
    return _cpu_backward_concat(
        do, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
    )


def _cpu_backward_split(
    do, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    B, _, T, _ = query.shape
    S = key.shape[2]
    if S > 0:
        if is_causal and T == S and attention_mask is None:
            bias, causal_flag = None, True  # bottom-right is ATen's top-left when T == S
        else:
            bias, causal_flag = (
                _key_bias(attention_mask, is_causal, B, T, S, query.dtype, query.device),
                False,
            )
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, query, key, value, out, lse, 0.0, causal_flag, attn_mask=bias, scale=scale
        )
        dq, dk, dv = _heads_last(dq), _heads_last(dk), _heads_last(dv)  # already are: no copy
    else:  # ATen's kernel would divide by zero
        dq, dk, dv = (_heads_last(torch.zeros_like(t)) for t in (query, key, value))
    dpk, dpv, dgate = _cpu_prompt_backward(do, query, prompt_key, prompt_value, gate, out, lse, scale, dq)
    return dq, dk, dv, dpk, dpv, dgate


def _cpu_prompt_backward(do, query, prompt_key, prompt_value, gate, out, lse, scale, dq):
    """The prompt segment's gradients with float32 matmuls; adds its part of dq into ``dq``.

    ``dgate[b, h] = sum_t sum_j exp(s_tj - lse_t) (dP_tj - delta_t)`` with ``s`` the UNGATED logit:
    equal to ``sum P_tj (dP_tj - delta_t) / gate``, and finite at gate = 0."""
    B, H, T, Dh = query.shape
    Hkv, P = prompt_key.shape[1], prompt_key.shape[2]
    f32, dt = torch.float32, query.dtype
    if P == 0:
        zeros = torch.zeros(prompt_key.shape, dtype=dt, device=query.device)
        return zeros, zeros.clone(), torch.zeros(B, H, dtype=f32, device=query.device)
    dof, qf = do.to(f32), query.to(f32)
    s = torch.matmul(_grouped(qf, Hkv), prompt_key.to(f32).transpose(-1, -2)).view(B, H, T, P)
    s.mul_(scale).sub_(lse[..., None])  # ungated logit - lse (lse = +inf on rows with no weight)
    p = torch.exp(s + torch.log(_gate_2d(gate))[:, :, None, None])  # the prompt probabilities
    pu = s.exp_()
    dp = torch.matmul(_grouped(dof, Hkv), prompt_value.to(f32).transpose(-1, -2)).view(B, H, T, P)
    dp.sub_((dof * out.to(f32)).sum(dim=-1, keepdim=True))  # dP - delta
    dgate = (pu * dp).sum(dim=(2, 3))
    ds = _grouped(dp.mul_(p), Hkv)  # [B, Hkv, rep * T, P]
    dq.add_(torch.matmul(ds, prompt_key.to(f32)).view(B, H, T, Dh).to(dt), alpha=scale)
    dpk = torch.matmul(ds.transpose(-1, -2), _grouped(qf, Hkv)).mul_(scale)  # [B, Hkv, P, Dh]
    dpv = torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(dof, Hkv))
    if prompt_key.shape[0] == 1 and B > 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    return dpk.to(dt), dpv.to(dt), dgate


def _cpu_backward_concat(
    do, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    B, H, _T, _Dh = query.shape
    S, P = key.shape[2], prompt_key.shape[2]
    dt = query.dtype
    kc, vc, bias, _, _ = _cpu_operands(
        query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal
    )
    if kc.shape[2] == 0:
        dq, dkc, dvc = torch.zeros_like(query), torch.zeros_like(kc), torch.zeros_like(vc)
    else:
        dq, dkc, dvc = _cpu_backward_gemm(do, query, kc, vc, out, lse, bias, scale)
    if kc.shape[2] == P + S and P > 0:
        # Slices of one buffer: copy (views would alias each other, which custom ops forbid).
        dk = heads_last_empty(key.shape, dtype=dt, device=key.device).copy_(dkc[:, :, P:])
        dv = heads_last_empty(value.shape, dtype=dt, device=value.device).copy_(dvc[:, :, P:])
        dpk, dpv = dkc[:, :, :P], dvc[:, :, :P]
        if prompt_key.shape[0] == 1 and B > 1:
            dpk = dpk.sum(0, keepdim=True, dtype=torch.float32).to(dt)
            dpv = dpv.sum(0, keepdim=True, dtype=torch.float32).to(dt)
        else:
            dpk = dpk.clone(memory_format=torch.contiguous_format)
            dpv = dpv.clone(memory_format=torch.contiguous_format)
    else:
        dk, dv = _heads_last(dkc), _heads_last(dvc)
        dpk = torch.zeros(prompt_key.shape, dtype=dt, device=query.device)
        dpv = torch.zeros(prompt_value.shape, dtype=dt, device=query.device)
    if P > 0:
        dgate = _dgate_from_lse(do, query, prompt_key, prompt_value, out, lse, scale)
    else:
        dgate = torch.zeros(B, H, dtype=torch.float32, device=query.device)
    return _heads_last(dq), dk, dv, dpk, dpv, dgate


# ----------------------------------------------------------------------------------------------
# Generic torch path (non-CPU tensors without Triton): the reference, autograd for the backward


def _lse_torch(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale):
    B, H, T, _Dh = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    f, rep = torch.float32, H // Hkv
    q = query.to(f)
    sk = torch.matmul(q, key.to(f).repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    kb = _key_bias(attention_mask, is_causal, B, T, S, query.dtype, query.device)
    if kb is not None:
        sk = sk + kb
    pk = prompt_key.to(f).expand(B, -1, -1, -1).repeat_interleave(rep, 1)
    sp = torch.matmul(q, pk.transpose(-1, -2)) * scale + torch.log(_gate_2d(gate))[:, :, None, None]
    lse = torch.logsumexp(torch.cat([sp, sk], dim=-1), dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf")).contiguous()


def _generic_backward(
    grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale
):
    leaves = [t.detach().requires_grad_() for t in (query, key, value, prompt_key, prompt_value, gate)]
    with torch.enable_grad():
        out = gated_prefix_attention_reference(*leaves, attention_mask, is_causal, scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return (*(_heads_last(g) for g in grads[:3]), *(g.contiguous() for g in grads[3:]))


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd


def _route(query: torch.Tensor) -> str:
    """``"triton"``, ``"cpu"`` (the fused CPU path) or ``"generic"`` (reference + autograd)."""
    backend = _backend.select(OP, query.device, has_cpp=False)
    if backend == "triton":
        from prompt_kernels.kernels import gated_prefix_attention as kernels

        if kernels.supports(query.shape[-1], query.dtype):
            return "triton"
        msg = (
            f"{OP}: the Triton kernels take head sizes 32, 64, 80, 96 and 128, "
            f"got {query.shape[-1]} x {query.dtype}"
        )
        if _backend.requested_backend() == "triton":
            raise _backend.BackendUnavailableError(msg)
        _backend._warn_once(msg + "; running the PyTorch path")
    return "cpu" if query.device.type == "cpu" else "generic"


@torch.library.custom_op("prompt_kernels::gated_prefix_attention", mutates_args=())
def _gpa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prompt_key: torch.Tensor,
    prompt_value: torch.Tensor,
    gate: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, H, T, Dh], lse [B, H, T] float32)."""
    args = (query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale)
    route = _route(query)
    if route == "triton":
        from prompt_kernels.kernels import gated_prefix_attention as kernels

        return kernels.forward(*args)
    if route == "cpu":
        return cpu_forward(*args)
    return gated_prefix_attention_reference(*args), _lse_torch(*args)


@_gpa_op.register_fake
def _(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale):
    B, H, T, _ = query.shape
    return query.new_empty(query.shape), query.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("prompt_kernels::gated_prefix_attention_backward", mutates_args=())
def _gpa_backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prompt_key: torch.Tensor,
    prompt_value: torch.Tensor,
    gate: torch.Tensor,
    attention_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dprompt_key, dprompt_value, dgate), dgate in the gate's shape and dtype; dq, dk
    and dv in the heads-last layout (:func:`heads_last_empty`) on every backend."""
    route = _route(query)
    ins = (query, key, value, prompt_key, prompt_value, gate, attention_mask)
    if route == "triton":
        from prompt_kernels.kernels import gated_prefix_attention as kernels

        *grads, dgate = kernels.backward(grad_out, *ins, out, lse, is_causal, scale)
    elif route == "cpu":
        *grads, dgate = cpu_backward(grad_out, *ins, out, lse, is_causal, scale)
    else:
        return _generic_backward(grad_out, *ins, is_causal, scale)
    return (*grads, _reduce_gate_grad(dgate, gate))


@_gpa_backward_op.register_fake
def _(
    grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    dq, dk, dv = (heads_last_empty(t.shape, dtype=t.dtype, device=t.device) for t in (query, key, value))
    return (dq, dk, dv, *(t.new_empty(t.shape) for t in (prompt_key, prompt_value, gate)))


def _setup_context(ctx, inputs, output):
    query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = _gpa_backward_op(
        grad_out,
        query,
        key,
        value,
        prompt_key,
        prompt_value,
        gate,
        attention_mask,
        out,
        lse,
        ctx.is_causal,
        ctx.scale,
    )
    return (*grads, None, None, None)


_gpa_op.register_autograd(_backward, setup_context=_setup_context)


def gated_prefix_attention(
    query, key, value, prompt_key, prompt_value, gate, attention_mask=None, is_causal=False, scale=None
):
    """Attention over P gated prompt keys/values and S keys/values (see the module docstring).

    Dispatches per call to the Triton kernels (CUDA) or the fused CPU path; differentiable with
    respect to query, key, value, prompt_key, prompt_value and gate.
    """
    Dh = _check(query, key, value, prompt_key, prompt_value, gate, attention_mask, scale)[3]
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    scale = Dh**-0.5 if scale is None else float(scale)
    out, _ = _gpa_op(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale)
    return out
