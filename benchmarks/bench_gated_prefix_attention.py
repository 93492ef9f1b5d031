"""gated_prefix_attention benchmarks at B=8, H=12, T=S=128, P=16, Dh=64 (a BERT-base layer with a
16-token prefix), forward and forward+backward, in float32 with a key-padding mask (encoder) and
causal (decoder), and in bf16 with the padding mask. The gate is one learnable scalar per layer
(SPT style), the prompt is shared by the batch.

Providers: ``prompt_kernels`` (the default backend: the fused CPU path on CPU, Triton on CUDA;
there, forward+backward also as ``prompt_kernels (three launches)``, the one-launch backwards off),
``torch_reference`` (the plain-PyTorch specification) and ``cat+sdpa`` (what an eager
implementation does: ``torch.cat`` the prompt in front of the keys/values, ``log(gate)`` and the
masks as an additive bias, ``F.scaled_dot_product_attention``, autograd for the backward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.common import Case
from prompt_kernels.ops import gated_prefix_attention
from prompt_kernels.ops.reference import gated_prefix_attention as reference

KERNEL = "gated_prefix_attention"


def cat_sdpa(query, key, value, prompt_key, prompt_value, gate, attention_mask=None, is_causal=False):
    """The eager baseline: concatenate, fold log(gate) and the masks into one bias, SDPA."""
    B, H, T, _ = query.shape
    S, P = key.shape[2], prompt_key.shape[2]
    k = torch.cat([prompt_key.expand(B, -1, -1, -1), key], dim=2)
    v = torch.cat([prompt_value.expand(B, -1, -1, -1), value], dim=2)
    key_bias = torch.zeros(B, 1, T, S, dtype=query.dtype, device=query.device)
    if attention_mask is not None:
        key_bias = key_bias.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
    if is_causal:
        causal = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
        key_bias = key_bias.masked_fill(~causal, float("-inf"))
    gate_bias = torch.log(gate.to(query.dtype)).expand(B, H).reshape(B, H, 1, 1).expand(B, H, T, P)
    bias = torch.cat([gate_bias, key_bias.expand(B, H, T, S)], dim=-1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=bias, enable_gqa=True)


def _inputs(B, H, T, S, P, Dh, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    q, k, v = r(B, H, T, Dh), r(B, H, S, Dh), r(B, H, S, Dh)
    pk, pv = r(1, H, P, Dh), r(1, H, P, Dh)
    gate = torch.full((1,), 0.5, device=device)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    return [q, k, v, pk, pv, gate], mask


PROVIDERS = {"prompt_kernels": gated_prefix_attention, "torch_reference": reference, "cat+sdpa": cat_sdpa}


@contextlib.contextmanager
def three_launches():
    """The Triton backward's one-launch paths (fused short keys, rows short queries) switched off for
    the block, which must hold the backward too: on CUDA the first GPU run compares the two designs
    side by side."""
    from prompt_kernels.kernels.gated_prefix_attention import rows_path, short_path

    with short_path(False), rows_path(False):
        yield


def cases(quick: bool) -> list[Case]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, T, S, P, Dh = 8, 12, 128, 128, 16, 64
    out = []
    variants = [("pad mask", torch.float32), ("causal", torch.float32), ("pad mask", torch.bfloat16)]
    for variant, dtype in variants[:1] if quick else variants:
        tensors, mask = _inputs(B, H, T, S, P, Dh, dtype, device)
        mask = mask if variant == "pad mask" else None
        causal = variant == "causal"
        tag = "" if dtype == torch.float32 else f" {str(dtype).replace('torch.', '')}"
        size = f"B{B} H{H} T{T} S{S} P{P} Dh{Dh} {variant}{tag}"
        for name, fn in PROVIDERS.items():

            def fwd(fn=fn, mask=mask, causal=causal, tensors=tensors):
                with torch.no_grad():
                    return fn(*tensors, mask, causal)

            out.append(Case(KERNEL, name, "forward", size, fwd, measure_memory=True))
        leaves = [t.clone().requires_grad_() for t in tensors]
        grad_out = torch.randn(B, H, T, Dh, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        providers = {name: (fn, contextlib.nullcontext) for name, fn in PROVIDERS.items()}
        if device == "cuda":  # (on CPU the default backend has no Triton launches to choose between)
            providers["prompt_kernels (three launches)"] = (gated_prefix_attention, three_launches)
        for name, (fn, context) in providers.items():

            def step(fn=fn, context=context, mask=mask, causal=causal, leaves=leaves, grad_out=grad_out):
                with context():
                    return torch.autograd.grad(fn(*leaves, mask, causal), leaves, grad_out)

            out.append(Case(KERNEL, name, "forward+backward", size, step, measure_memory=True))
    return out
