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
  * ``torch`` on CPU: float32 training calls whose probability matrix fits ``_SAVE_PROBS_ELEMENTS``
    run batched GEMMs on the prompt and keys concatenated, with the gate and masks folded into one
    additive bias (``log gate`` on the prompt columns), and keep the probabilities, the
    concatenation and the prompt scores for a 4-GEMM backward (as autograd through SDPA's math path
    keeps its operands); larger float32 training calls run the same GEMM forward in cache-sized
    blocks, keeping only the log-sum-exp; inference and fp16/bf16 run ATen's fused CPU flash
    attention forward on the concatenation. Without kept probabilities the backward is blockwise
    GEMMs that recompute each segment's probabilities from the saved log-sum-exp (see
    :func:`cpu_backward`). Compared with the reference and with autograd through
    ``scaled_dot_product_attention`` on the concatenation in
    benchmarks/notes/gated_prefix_attention.md.
  * ``torch`` on other devices (CUDA without Triton): the reference, differentiated by autograd.

Eager calls run the custom ops' implementations directly (inference without autograd, training
through :func:`prompt_kernels._eager.eager_function`); under ``torch.compile`` the custom ops are
traced.

Both custom ops share one convention for the saved ``lse`` [B, H, T] (float32, natural log of the
row's total weight, ``+inf`` on rows with no weight), so a backward may run on another backend than
its forward. One kind of row cannot be stored that way: Hugging Face pads additive masks with
``finfo(float32 or bfloat16).min``, finite but so large that q.k vanishes next to it; a query row
whose weighted keys all carry such a value ("saturated": below ``-FLT_MAX * ln 2``, where the Triton
kernels' base-2 logits would overflow), with no prompt weight (P = 0 or gate 0), is softmax over
equal scores, uniform over those keys, as softmax of the biased scores in float64 gives; but its
log(count of keys) vanishes next to the huge logit in float32. Such rows store an ``lse`` below
``_SATURATED_LSE`` (the huge logit itself) and every backward recomputes their probabilities as
1 / (number of saturated keys the row sees), never ``exp(s - lse)``. The gate's gradient there is
``exp(s_prompt - lse) * (dP - delta)`` with an overflowing exponent: it is clamped as the reference
clamps it (0 where grad_out is 0, as on the padded positions Hugging Face gives those rows).
"""

from __future__ import annotations

import math

import torch

from prompt_kernels import _backend, _eager, _validate
from prompt_kernels.floors import (  # noqa: F401  (the op's floors, re-exported)
    gated_prefix_attention_floors,
    visible_key_pairs,
)

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
    if (
        (prompt_key.shape[0] != 1 and prompt_key.shape[0] != B)
        or prompt_key.shape[1] != Hkv
        or prompt_key.shape[3] != Dh
    ):
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
                or (attention_mask.shape[1] != 1 and attention_mask.shape[1] != H)
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
    g = gate.to(scores.dtype).expand(B, H)[:, :, None, None]
    # The running max leaves out prompt logits whose weight is 0 (gate 0): with them in, a row whose
    # keys are all padded with a finite finfo.min would underflow to zeros instead of averaging.
    live = torch.cat([scores[..., :P].masked_fill(g == 0, float("-inf")), scores[..., P:]], dim=-1)
    m = live.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # A gated-out prompt logit may exceed the max; its weight is multiplied by 0 below, but exp must
    # stay finite for that product (and dgate) to be defined.
    w = torch.exp((scores - m).clamp(max=math.log(torch.finfo(scores.dtype).max) - 1))
    w = torch.cat([w[..., :P] * g, w[..., P:]], dim=-1)
    z = w.sum(dim=-1, keepdim=True)
    num = torch.matmul(w, v)
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    return torch.where(z > 0, num / safe_z, torch.zeros_like(num)).to(query.dtype)


# ----------------------------------------------------------------------------------------------
# CPU path: batched GEMMs or ATen's fused flash attention on the concatenation, the gate as a bias


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


def grad_layout(probs: torch.Tensor) -> str:
    """Layout of dq, dk and dv from the backward op: ``"contiguous"`` [N, heads, rows, Dh] after a
    CPU forward that kept the probabilities (``probs`` non-empty: its GEMMs write the gradients
    directly), else ``"heads_last"`` (:func:`heads_last_empty`, what ATen's CPU flash attention and
    the Triton kernels write; Hugging Face's transpose back to [B, T, H, Dh] is then free)."""
    return "contiguous" if probs.numel() > 0 else "heads_last"


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


def _prompt_first(prompt: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, P + S, Dh]: the prompt rows ([B or 1, Hkv, P, Dh]) in front of ``seq`` [B, Hkv, S, Dh]."""
    B, Hkv, S, Dh = seq.shape
    P = prompt.shape[2]
    out = seq.new_empty((B, Hkv, P + S, Dh))
    out[:, :, :P] = prompt
    out[:, :, P:] = seq
    return out


def _cpu_operands(
    query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, keep_prompt=False
):
    """-> (keys [B, Hkv, L, Dh], values, bias [.., .., .., L] float32 or None, key bias or None, gate 2d).

    L = P + S with the prompt in front, or L = S when no prompt weight is nonzero (gate = 0 removes
    the prompt exactly, so it is left out) unless ``keep_prompt``."""
    B, _, T, _ = query.shape
    S, P = key.shape[2], prompt_key.shape[2]
    kb = _key_bias(attention_mask, is_causal, B, T, S, query.dtype, query.device)
    g2 = _gate_2d(gate)
    if P == 0 or not (keep_prompt or bool((g2 != 0).any())):
        return key, value, kb, kb, g2
    L = P + S
    kc, vc = _prompt_first(prompt_key, key), _prompt_first(prompt_value, value)
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


# float32 calls whose probability matrix has at most this many elements keep it for the backward
# (as autograd through SDPA's math path does): 4 batched GEMMs there instead of 5 and no
# recomputation. Larger ones, and fp16/bf16, recompute it blockwise from the log-sum-exp.
_SAVE_PROBS_ELEMENTS = 1 << 23


def saves_probs(query: torch.Tensor, key: torch.Tensor, prompt_key: torch.Tensor) -> bool:
    """Whether the CPU path's forward returns the probabilities [B, H, T, P + S] (a function of
    shapes, dtype and device only, so the op's fake agrees with it)."""
    B, H, T, _ = query.shape
    n = B * H * T * (key.shape[2] + prompt_key.shape[2])
    return query.device.type == "cpu" and query.dtype == torch.float32 and 0 < n <= _SAVE_PROBS_ELEMENTS


def _no_probs(query: torch.Tensor) -> torch.Tensor:
    return query.new_empty((0,), dtype=torch.float32)


def _nothing_kept(query: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty (probs, keys, values, prompt_scores): distinct tensors (a custom op's outputs may not
    alias)."""
    return tuple(_no_probs(query) for _ in range(4))


def cpu_forward_gemm(
    query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale, keep_probs
):
    """float32 -> (out [B, H, T, Dh], lse [B, H, T], probs [B, H, T, P + S], keys, values
    [B, Hkv, P + S, Dh], prompt_scores [B, H, T, P]): batched GEMMs on the concatenation with the
    gate and masks as one bias, ``softmax`` (accurate, and its vectorised exp stays fast on -inf;
    ATen's ``exp`` does not) and ``lse = max - log(max probability)``, one cache-sized block of batch
    items (or of query rows) at a time. When ``keep_probs`` the backward's operands are returned
    (else empty): the probabilities and the concatenated keys and values, as autograd through SDPA
    on a concatenation keeps them, and the prompt columns' scaled scores before the gate enters
    (for dgate)."""
    B, H, T, Dh = query.shape
    Hkv, P = key.shape[1], prompt_key.shape[2]
    if P > 0 and not bool((gate != 0).any()):
        # No weight on the prompt: compute exactly what P = 0 computes, then widen the probabilities.
        out, lse, probs, *_ = cpu_forward_gemm(
            query,
            key,
            value,
            prompt_key[:, :, :0],
            prompt_value[:, :, :0],
            gate,
            attention_mask,
            is_causal,
            scale,
            keep_probs,
        )
        if not keep_probs:
            return out, lse, *_nothing_kept(query)
        probs = torch.cat([probs.new_zeros((B, H, T, P)), probs], dim=-1)
        kc, vc = _prompt_first(prompt_key, key), _prompt_first(prompt_value, value)
        scores = torch.matmul(_grouped(query, Hkv), prompt_key.transpose(-1, -2)).view(B, H, T, P)
        return out, lse, probs, kc, vc, scores.mul_(scale)
    kc, vc, bias, _, g2 = _cpu_operands(
        query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, keep_prompt=True
    )
    keep_scores = keep_probs and P > 0
    if keep_scores and bias is not None:
        bias[..., :P] = 0.0  # the gate enters after the ungated scores are kept (below)
    L = kc.shape[2]
    if L == 0 or query.numel() == 0:
        out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
        return out, torch.full((B, H, T), float("inf"), device=query.device), *_nothing_kept(query)
    out = query.new_empty((B, H, T, Dh))
    lse = query.new_empty((B, H, T))
    probs = query.new_empty((B, H, T, L)) if keep_probs else _no_probs(query)
    width = H * max(L, 1)  # elements of one query row's block, over all heads
    # Kept probabilities are materialised anyway: one block (fewer, larger GEMMs scale better over
    # threads). Otherwise cache-sized blocks bound the memory.
    block = B * T * width if keep_probs else _BLOCK_ELEMENTS
    items = max(1, block // (width * max(T, 1)))
    rows = T if width * T <= block else max(1, block // width)
    for b0 in range(0, B, items):
        b1 = min(B, b0 + items)
        nb = b1 - b0
        k_b, v_b, bias_b = kc[b0:b1], vc[b0:b1], _batch_rows(bias, b0, b1)
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            n = t1 - t0
            # Kept probabilities come in one block (rows == T): the scores are written there and
            # softmax runs in place.
            x = probs[b0:b1] if keep_probs else query.new_empty((nb, H, n, L))
            bias_c = bias_b if bias_b is None or bias_b.shape[2] == 1 else bias_b[:, :, t0:t1]
            _scores_into(x, query[b0:b1, :, t0:t1], k_b, bias_c, scale)
            if keep_scores:  # (one block)
                prompt_scores = x[..., :P].clone(memory_format=torch.contiguous_format)
                if bias is not None:  # (without a bias every gate is 1)
                    x[..., :P].add_(torch.log(g2)[:, :, None, None])
            m = x.amax(dim=-1)
            p = torch.softmax(x, dim=-1, out=x)
            dead = m == float("-inf")  # rows with no weight: softmax gives NaN there
            if bool(dead.any()):
                p.masked_fill_(dead[..., None], 0.0)
            torch.sub(m, p.amax(dim=-1).log_(), out=lse[b0:b1, :, t0:t1]).masked_fill_(dead, float("inf"))
            if nb == B and n == T:  # one block: the GEMM writes the output itself
                torch.matmul(_grouped(p, Hkv), v_b, out=_grouped(out, Hkv))
            else:
                out[b0:b1, :, t0:t1] = torch.matmul(_grouped(p, Hkv), v_b).view(nb, H, n, Dh)
    if keep_probs and P > 0:  # (with P = 0 they are key and value themselves: not an output)
        return out, lse, probs, kc, vc, prompt_scores
    return out, lse, probs, *_nothing_kept(query)[1:]


def _scores_into(x, query, keys, bias, scale) -> None:
    """x [nb, H, n, L] (contiguous) <- scale * query.keys^T + bias: one batched GEMM whose alpha
    applies the scale and whose beta adds the bias copied in first (no separate passes).

    query [nb, H, n, Dh]; keys [nb, Hkv, L, Dh]; bias broadcastable to x, or None."""
    nb, H, n, L = x.shape
    Hkv = keys.shape[1]
    x3 = x.view(nb * Hkv, -1, L)
    q3 = query.reshape(nb * Hkv, -1, query.shape[-1])
    k3 = keys.reshape(nb * Hkv, L, keys.shape[-1]).transpose(1, 2)
    if bias is None:
        x3.baddbmm_(q3, k3, beta=0.0, alpha=scale)  # beta = 0: x's old contents are ignored
    else:
        x.copy_(bias.expand(nb, H, n, L))
        x3.baddbmm_(q3, k3, alpha=scale)


def cpu_forward(
    query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale, for_backward=True
):
    """-> (out [B, H, T, Dh], lse [B, H, T] float32 (+inf on rows with no weight), probs, keys,
    values, prompt_scores): float32 with a backward to follow through :func:`cpu_forward_gemm` (keeping the
    probabilities and the concatenated keys/values where :func:`saves_probs`; its log-sum-exp is
    accurate, which the recomputing backward needs); inference and fp16/bf16 through ATen's fused
    CPU flash attention on the concatenation (faster here), the kept tensors empty. See
    :func:`cpu_forward_gemm` for the kept tensors (probs, keys, values, prompt_scores)."""
    args = (query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale)
    if query.dtype == torch.float32 and for_backward:
        return cpu_forward_gemm(*args, keep_probs=saves_probs(query, key, prompt_key))
    return (*_cpu_forward_flash(*args), *_nothing_kept(query))


def cpu_inference(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale):
    """What :func:`gated_prefix_attention` computes in eager CPU inference, without its input checks,
    backend choice or dispatch: for callers that built the inputs to the op's contract themselves (the
    patch layer, once per layer and generated token). ``scale`` must be given (a float)."""
    return _cpu_forward_flash(
        query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale
    )[0]


def _cpu_forward_flash(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale):
    B, H, T, _Dh = query.shape
    S, P = key.shape[2], prompt_key.shape[2]
    if 0 < P and 0 < 4 * T <= S:
        return _cpu_forward_two_segments(
            query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale
        )
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
    return out, lse  # as ATen lays it out (usually [B, T, H, Dh] storage)


def _cpu_forward_two_segments(
    query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale
):
    """Few queries over many keys (decoding with a key/value cache): ATen's flash attention over each
    segment (the P prompt keys, unmasked; the S keys with their mask) and the two merged by their
    log-sum-exps, ``log(gate)`` added to the prompt's. Exactly the attention over the concatenation,
    without copying the whole cache behind the prompt at every call."""
    B, H, T, _Dh = query.shape
    S = key.shape[2]
    kb = _key_bias(attention_mask, is_causal, B, T, S, query.dtype, query.device)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    pk = prompt_key.expand(B, -1, -1, -1)
    pv = prompt_value.expand(B, -1, -1, -1)
    out_p, lse_p = flash(query, pk, pv, 0.0, False, scale=scale)
    out_k, lse_k = flash(query, key, value, 0.0, False, attn_mask=kb, scale=scale)
    g2 = _gate_2d(gate)
    if bool((g2 != 1).any()):
        lse_p = lse_p + torch.log(g2)[:, :, None]  # log(0) = -inf: no prompt weight
    dead = None
    if kb is not None:  # ATen gives lse 0 on a row with no key: it has no weight
        no_key = (kb == float("-inf")).all(dim=-1).expand(B, H, T)
        if bool(no_key.any()):
            lse_k = lse_k.masked_fill(no_key, float("-inf"))
            dead = no_key & (lse_p == float("-inf"))
    # The prompt's share of the row's weight: sigmoid(lse_p - lse_k); merged in float32.
    diff = lse_p - lse_k
    if dead is not None:
        diff = diff.masked_fill(dead, 0.0)
    w_p = torch.sigmoid(diff)[..., None]
    out_k = out_k.float()
    out = torch.addcmul(out_k, out_p.float() - out_k, w_p)
    lse = torch.logaddexp(lse_p, lse_k)
    if dead is not None:  # no weight at all: out 0, lse +inf (the shared convention)
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("inf"))
    return out.to(query.dtype), lse


_LOG2E = 1.4426950408889634
_FLT_MAX = torch.finfo(torch.float32).max
# An lse below this marks a saturated row; an additive bias below it is a saturated key (module
# docstring). The Triton kernels use the same bound (kernels.gated_prefix_attention.SATURATED_LSE).
_SATURATED_LSE = -_FLT_MAX * math.log(2.0)
# exp's argument where a gated-out prompt logit exceeds the row's lse: clamped as the reference does.
_EXP_CLAMP = math.log(_FLT_MAX) - 1.0
# The CPU backward works on blocks of batch items (or of query rows) whose fp32 probability matrix
# holds at most this many elements, so that a block's intermediates stay in cache.
_BLOCK_ELEMENTS = 1 << 18


def _grouped(t: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, H, T, X] -> [B, Hkv, (H // Hkv) * T, X]: the query heads of a kv head as one matrix."""
    return t.reshape(t.shape[0], Hkv, -1, t.shape[-1])


def _segment_probs(qg, dog, k, v, bias, lse, delta, scale, shape, saturated=None):
    """One key segment's probabilities and score gradients for a block of query rows, in float32.

    qg, dog [B, Hkv, rep * n, Dh]; k, v [B or 1, Hkv, L, Dh]; bias broadcastable to ``shape`` =
    [B, H, n, L] or None (None: the prompt segment, whose ungated probabilities are returned, their
    exponent clamped at ``_EXP_CLAMP``); lse and delta = rowsum(grad_out * out), both [B, H, n, 1];
    ``saturated``: None, or (rows [B, H, n, 1] bool, probabilities broadcastable to ``shape``) that
    replace ``exp(s - lse)`` on the saturated rows (module docstring).
    -> (p, ds = p * (dP - delta)), both ``shape``.

    The exponent ``s * scale + bias - lse`` is formed in the natural-log domain (one rounding per
    term, as softmax does) and only then scaled for ``exp2``: ATen's CPU ``exp`` is about 100x slower
    on arguments below -87 (masked keys, far-off logits), ``exp2`` is not."""
    f32 = torch.float32
    x = torch.matmul(qg, k.transpose(-1, -2)).view(shape).to(f32).mul_(scale)
    if bias is not None:
        x.add_(bias)
    x.sub_(lse)
    if bias is None:
        x.clamp_(max=_EXP_CLAMP)  # a gated-out prompt on a row whose keys have (next to) no weight
    p = x.mul_(_LOG2E).exp2_()  # lse = +inf (rows with no weight) gives 0
    if saturated is not None:
        p = torch.where(saturated[0], saturated[1], p)
    ds = torch.matmul(dog, v.transpose(-1, -2)).view(shape).to(f32)
    return p, ds.sub_(delta).mul_(p)


def _saturated_rows(key_bias, lse1):
    """-> (rows [B, H, T, 1] bool, probabilities [B or 1, 1 or H, T or 1, S] float32) of the saturated
    rows (lse below ``_SATURATED_LSE``): uniform over the saturated keys each row sees; or (None, None)
    when there are none (module docstring)."""
    if key_bias is None:
        return None, None
    rows = lse1 < _SATURATED_LSE
    if not bool(rows.any()):
        return None, None
    keys = (key_bias < _SATURATED_LSE) & (key_bias > float("-inf"))
    return rows, keys / keys.sum(dim=-1, keepdim=True).clamp_(min=1)


def _accumulate(acc, x):
    return x if acc is None else acc.add_(x)


def _batch_rows(t: torch.Tensor | None, b0: int, b1: int) -> torch.Tensor | None:
    """``t[b0:b1]``, or ``t`` itself where its batch dimension is a broadcast 1."""
    return t if t is None or t.shape[0] == 1 else t[b0:b1]


def _scaled_matmul(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` for [N, G, m, k] x [N, G, k, n] -> [N, G, m, n] contiguous: one batched GEMM
    whose alpha applies the scale (no separate pass). ``a`` may be a transposed or column-sliced
    view (its rows strided), as BLAS reads it in place."""
    N, G, m, k = a.shape
    n = b.shape[-1]
    out = a.new_empty((N, G, m, n))
    out.view(N * G, m, n).baddbmm_(a.reshape(N * G, m, k), b.reshape(N * G, k, n), beta=0.0, alpha=scale)
    return out


def cpu_backward_probs(
    grad_out, query, key, value, prompt_key, prompt_value, out, lse, probs, keys, values, prompt_scores, scale
):
    """float32 backward from what :func:`cpu_forward_gemm` kept: the probabilities [B, H, T, P + S],
    the concatenated keys and values [B, Hkv, P + S, Dh] (empty when P = 0: key and value) and the
    prompt columns' scaled scores [B, H, T, P].

    The gradients of the two segments come from GEMMs on column slices of the probabilities and of
    their gradient, so dq, dk and dv are written by the GEMMs themselves, contiguous (this path's
    layout; the others give heads-last, see :func:`grad_layout`) and without a copy."""
    B, H, T, Dh = query.shape
    Hkv, P = key.shape[1], prompt_key.shape[2]
    do = grad_out.to(query.dtype)
    kc, vc = (keys, values) if P > 0 else (key, value)
    delta = (do * out).sum(-1, keepdim=True)
    dog, qg, pg = _grouped(do, Hkv), _grouped(query, Hkv), _grouped(probs, Hkv)
    dv = torch.matmul(pg[..., P:].transpose(-1, -2), dog)
    dpv = torch.matmul(pg[..., :P].transpose(-1, -2), dog)
    dp = torch.matmul(dog, vc.transpose(-1, -2)).view(probs.shape)
    # dgate from the UNGATED prompt probabilities exp(s - lse) (P columns, before dp is overwritten):
    # finite at gate 0, and without the rounding of log(gate) that dividing the gated ones by it
    # would add.
    dgate = query.new_zeros((B, H))
    if P > 0:
        pu = torch.sub(prompt_scores, lse[..., None]).clamp_(max=_EXP_CLAMP).mul_(_LOG2E).exp2_()
        dgate = pu.mul_(dp[..., :P] - delta).sum(dim=(2, 3))
    dsg = _grouped(dp.sub_(delta).mul_(probs), Hkv)
    dq = _scaled_matmul(dsg, kc, scale).view(B, H, T, Dh)
    dk = _scaled_matmul(dsg[..., P:].transpose(-1, -2), qg, scale)
    dpk = _scaled_matmul(dsg[..., :P].transpose(-1, -2), qg, scale)
    if prompt_key.shape[0] == 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    return dq, dk, dv, dpk, dpv, dgate


def cpu_backward(
    grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, is_causal, scale
):
    """-> (dq, dk, dv, dprompt_key, dprompt_value, dgate [B, H] float32).

    Batched GEMMs per segment, never concatenating: each segment's probabilities are recomputed from
    the saved log-sum-exp, one block of batch items (or of query rows) at a time, sized by
    ``_BLOCK_ELEMENTS`` so that a block's intermediates stay in cache and the whole
    [B, H, T, P + S] matrix is never held. 2-3x faster here than ATen's fused CPU flash-attention
    backward in fp16/bf16 and about as fast in float32 (benchmarks/notes/gated_prefix_attention.md).
    ``dgate[b, h] = sum_t sum_j exp(s_tj - lse_t) (dP_tj - delta_t)`` with ``s`` the UNGATED prompt
    logit: equal to ``sum P_tj (dP_tj - delta_t) / gate``, and finite at gate = 0."""
    B, H, T, Dh = query.shape
    Hkv, S, P = key.shape[1], key.shape[2], prompt_key.shape[2]
    f32, dt, dev = torch.float32, query.dtype, query.device
    do = grad_out.to(dt)
    dq = heads_last_empty(query.shape, dtype=dt, device=dev)
    dk = heads_last_empty(key.shape, dtype=dt, device=dev)
    dv = heads_last_empty(value.shape, dtype=dt, device=dev)
    dpk = torch.zeros(prompt_key.shape, dtype=f32, device=dev)
    dpv = torch.zeros(prompt_value.shape, dtype=f32, device=dev)
    dgate = torch.zeros(B, H, dtype=f32, device=dev)
    kb = _key_bias(attention_mask, is_causal, B, T, S, dt, dev)
    g4 = _gate_2d(gate)[:, :, None, None]
    lse1 = lse[..., None]
    sat_rows, uniform = _saturated_rows(kb, lse1)
    delta = (do.to(f32) * out.to(f32)).sum(-1, keepdim=True)
    width = H * max(P, S, 1)  # elements of one query row's block, over all heads
    per_item = width * max(T, 1)
    items = max(1, _BLOCK_ELEMENTS // per_item)
    rows = T if per_item <= _BLOCK_ELEMENTS else max(1, _BLOCK_ELEMENTS // width)
    for b0 in range(0, B, items):
        b1 = min(B, b0 + items)
        nb = b1 - b0
        k_b, v_b = key[b0:b1], value[b0:b1]
        pk_b, pv_b, g_b = (_batch_rows(t, b0, b1) for t in (prompt_key, prompt_value, g4))
        dk_b = dv_b = None
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            n = t1 - t0
            qg, dog = _grouped(query[b0:b1, :, t0:t1], Hkv), _grouped(do[b0:b1, :, t0:t1], Hkv)
            lse_c, delta_c = lse1[b0:b1, :, t0:t1], delta[b0:b1, :, t0:t1]
            dq_c = None
            if S > 0:
                bias = _batch_rows(kb, b0, b1)
                if bias is not None and bias.shape[2] > 1:
                    bias = bias[:, :, t0:t1]
                sat = None
                if sat_rows is not None:
                    u = _batch_rows(uniform, b0, b1)
                    sat = (sat_rows[b0:b1, :, t0:t1], u if u.shape[2] == 1 else u[:, :, t0:t1])
                p, ds = _segment_probs(qg, dog, k_b, v_b, bias, lse_c, delta_c, scale, (nb, H, n, S), sat)
                p, ds = _grouped(p.to(dt), Hkv), _grouped(ds.to(dt), Hkv)
                dq_c = torch.matmul(ds, k_b)
                acc = f32 if rows < T else dt
                dk_b = _accumulate(dk_b, torch.matmul(ds.transpose(-1, -2), qg).to(acc))
                dv_b = _accumulate(dv_b, torch.matmul(p.transpose(-1, -2), dog).to(acc))
            if P > 0:
                pu, dsu = _segment_probs(qg, dog, pk_b, pv_b, None, lse_c, delta_c, scale, (nb, H, n, P))
                dgate[b0:b1].add_(dsu.sum(dim=(2, 3)))
                p, ds = _grouped(pu.mul_(g_b).to(dt), Hkv), _grouped(dsu.mul_(g_b).to(dt), Hkv)
                dq_p = torch.matmul(ds, pk_b)
                dq_c = dq_p if dq_c is None else dq_c.add_(dq_p)
                dpk_c = torch.matmul(ds.transpose(-1, -2), qg).to(f32)
                dpv_c = torch.matmul(p.transpose(-1, -2), dog).to(f32)
                if prompt_key.shape[0] == 1:
                    dpk.add_(dpk_c.sum(0, keepdim=True))
                    dpv.add_(dpv_c.sum(0, keepdim=True))
                else:
                    dpk[b0:b1].add_(dpk_c)
                    dpv[b0:b1].add_(dpv_c)
            block = dq[b0:b1, :, t0:t1]
            if dq_c is None:
                block.zero_()
            else:
                block.copy_(dq_c.view(nb, H, n, Dh)).mul_(scale)
        if dk_b is not None:
            dk[b0:b1].copy_(dk_b.mul_(scale))
            dv[b0:b1].copy_(dv_b)
    if T == 0:
        dk.zero_()
        dv.zero_()
    return dq, dk, dv, dpk.mul_(scale).to(dt), dpv.to(dt), dgate


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


def _gpa_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prompt_key: torch.Tensor,
    prompt_value: torch.Tensor,
    gate: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    for_backward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out [B, H, T, Dh], lse [B, H, T] float32, probs, keys, values, prompt_scores): where the CPU
    path keeps them for the backward (``for_backward`` and :func:`saves_probs`), ``probs``
    [B, H, T, P + S] float32 and, when P > 0, the concatenated ``keys`` and ``values``
    [B, Hkv, P + S, Dh] and the prompt columns' scaled ungated scores [B, H, T, P] float32; else
    empty."""
    args = (query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale)
    route = _route(query)
    if route == "triton":
        from prompt_kernels.kernels import gated_prefix_attention as kernels

        return (*kernels.forward(*args), *_nothing_kept(query))
    if route == "cpu":
        out, *rest = cpu_forward(*args, for_backward)
        return out.contiguous(), *rest
    return gated_prefix_attention_reference(*args), _lse_torch(*args), *_nothing_kept(query)


def _kept_shapes(query, key, prompt_key, for_backward) -> tuple[tuple[int, ...], ...]:
    """Shapes of the kept probabilities, keys (and values) and prompt scores."""
    if for_backward and _route(query) == "cpu" and saves_probs(query, key, prompt_key):
        P = prompt_key.shape[2]
        L = key.shape[2] + P
        if P == 0:
            return (*query.shape[:3], L), (0,), (0,)
        return (*query.shape[:3], L), (*key.shape[:2], L, key.shape[3]), (*query.shape[:3], P)
    return (0,), (0,), (0,)


_gpa_op = torch.library.custom_op("prompt_kernels::gated_prefix_attention", mutates_args=())(_gpa_impl)


@_gpa_op.register_fake
def _(query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale, for_backward=True):
    B, H, T, _ = query.shape
    f32 = torch.float32
    probs_shape, keys_shape, scores_shape = _kept_shapes(query, key, prompt_key, for_backward)
    probs = query.new_empty(probs_shape, dtype=f32)
    keys_dtype = key.dtype if len(keys_shape) > 1 else f32
    keys, values = (query.new_empty(keys_shape, dtype=keys_dtype) for _ in range(2))
    scores = query.new_empty(scores_shape, dtype=f32)
    return query.new_empty(query.shape), query.new_empty((B, H, T), dtype=f32), probs, keys, values, scores


def _gpa_backward_impl(
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
    probs: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    prompt_scores: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dprompt_key, dprompt_value, dgate), dgate in the gate's shape and dtype; dq, dk
    and dv in the layout :func:`grad_layout` gives."""
    route = _route(query)
    ins = (query, key, value, prompt_key, prompt_value, gate, attention_mask)
    if route == "cpu" and probs.numel() > 0:
        kept = (probs, keys, values, prompt_scores)
        *grads, dgate = cpu_backward_probs(grad_out, *ins[:5], out, lse, *kept, scale)
        return (*grads, _reduce_gate_grad(dgate, gate))
    if route == "triton":
        from prompt_kernels.kernels import gated_prefix_attention as kernels

        *grads, dgate = kernels.backward(grad_out, *ins, out, lse, is_causal, scale)
        grads = (*grads, _reduce_gate_grad(dgate, gate))
    elif route == "cpu":
        *grads, dgate = cpu_backward(grad_out, *ins, out, lse, is_causal, scale)
        grads = (*grads, _reduce_gate_grad(dgate, gate))
    else:
        grads = _generic_backward(grad_out, *ins, is_causal, scale)
    if grad_layout(probs) == "contiguous":  # the forward kept probabilities; another backend now
        grads = (*(g.contiguous() for g in grads[:3]), *grads[3:])
    return grads


_gpa_backward_op = torch.library.custom_op(
    "prompt_kernels::gated_prefix_attention_backward", mutates_args=()
)(_gpa_backward_impl)


@_gpa_backward_op.register_fake
def _(grad_out, query, key, value, prompt_key, prompt_value, gate, attention_mask, out, lse, probs, *_rest):
    heads_last = grad_layout(probs) == "heads_last"
    dq, dk, dv = (
        heads_last_empty(t.shape, dtype=t.dtype, device=t.device) if heads_last else t.new_empty(t.shape)
        for t in (query, key, value)
    )
    return (dq, dk, dv, *(t.new_empty(t.shape) for t in (prompt_key, prompt_value, gate)))


def _setup_context(ctx, inputs, output):
    query, key, value, prompt_key, prompt_value, gate, attention_mask, is_causal, scale, *_ = inputs
    out, *kept = output
    ctx.save_for_backward(query, key, value, prompt_key, prompt_value, gate, attention_mask, out, *kept)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(*kept)
    # Without this autograd hands the backward zero-filled gradients for the kept tensors (a pass
    # over the [B, H, T, P + S] matrix per step) that it never reads.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_grads_of_kept, backward_op=_gpa_backward_op):
    saved = ctx.saved_tensors  # the backward op's arguments after grad_out, in order
    if grad_out is None:
        grad_out = torch.zeros_like(saved[7])
    grads = backward_op(grad_out, *saved, ctx.is_causal, ctx.scale)
    return (*grads, None, None, None, None)


_gpa_op.register_autograd(_backward, setup_context=_setup_context)


_EagerGatedPrefixAttention = _eager.eager_function(
    "_EagerGatedPrefixAttention", _gpa_impl, _setup_context, _backward, _gpa_backward_impl
)


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
    tensors = (query, key, value, prompt_key, prompt_value, gate)
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not for_backward and not torch.compiler.is_compiling() and _route(query) == "cpu":
        # Eager inference needs neither autograd nor tracing: run the CPU path directly and return
        # out as ATen's flash kernel lays it out (the custom op promises a contiguous out, which
        # would cost a copy here).
        return cpu_forward(*tensors, attention_mask, is_causal, scale, for_backward=False)[0]
    return _eager.call(
        _gpa_op, _EagerGatedPrefixAttention, *tensors, attention_mask, is_causal, scale, for_backward
    )[0]
