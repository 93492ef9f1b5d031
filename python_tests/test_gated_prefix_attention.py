"""gated_prefix_attention: every backend against the float64 reference (value and the gradients of
query, key, value, prompt_key, prompt_value and gate), awkward sizes, every mask kind, causal with
T != S, GQA, gate 0 / gate 1 / per-head / per-batch gates, fully masked rows, broadcast prompts,
a backward on another backend than its forward, floors, opcheck, torch.compile and bad inputs.
Hugging Face's finfo.min padding with fully masked rows (value and every gradient), 64-bit element
offsets (read from the kernels' TTIR for sm_90) and launch grids within CUDA's limits for B * H over
65,535 (the launchers with recording stand-ins for the kernels).

The Triton kernels run under the interpreter with 16 x 16 blocks (``force_blocks``) so that tiny
shapes still cross block boundaries; two cases run the launcher's own block sizes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CAN_RUN_TRITON, INTERPRET, assert_within_budget, backends, max_err
from helpers import device_for as _device_for
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from prompt_kernels import use_backend as _use_backend
from prompt_kernels.ops import gated_prefix_attention
from prompt_kernels.ops.gated_prefix_attention import (
    _gpa_backward_op,
    _gpa_op,
    gated_prefix_attention_floors,
    grad_layout,
    heads_last_strides,
)
from prompt_kernels.ops.gated_prefix_attention import visible_key_pairs as _visible_key_pairs
from prompt_kernels.ops.reference import gated_prefix_attention as reference

# The Triton backend's three backward paths on the same small cases (where it takes the fused one):
# "triton-rows" with the fused backward for short key ranges switched off (``short_path(False)``),
# so the rows backward for short query ranges runs; "triton-long" with both switched off
# (``rows_path(False)`` too), so the three-launch backward for long ranges runs.
ROWS, LONG = "triton-rows", "triton-long"
BACKENDS = [*backends(has_cpp=False), ROWS, LONG]


@contextlib.contextmanager
def use_backend(backend: str):
    if backend not in (ROWS, LONG):
        with _use_backend(backend):
            yield
        return
    from prompt_kernels.kernels.gated_prefix_attention import rows_path, short_path

    with _use_backend("triton"), short_path(False), rows_path(backend == ROWS):
        yield


def device_for(backend: str) -> str:
    return _device_for("triton" if backend in (ROWS, LONG) else backend)


NAMES = ("out", "query", "key", "value", "prompt_key", "prompt_value", "gate")


def _blocks(backend: str, small: bool = True):
    """Small blocks for the interpreted kernels (the multi-block loops at tiny sizes)."""
    if backend in ("triton", ROWS, LONG) and small and INTERPRET:
        from prompt_kernels.kernels.gated_prefix_attention import force_blocks

        return force_blocks(16, 16)
    return contextlib.nullcontext()


def make_gate(kind: str, B: int, H: int) -> torch.Tensor:
    rnd = lambda *s: torch.rand(*s) * 0.9 + 0.05
    return {
        "scalar": lambda: rnd(()),
        "one_elem": lambda: rnd(1),
        "head": lambda: rnd(H),
        "batch": lambda: rnd(B, 1),
        "bh": lambda: rnd(B, H),
        "zero": lambda: torch.zeros(1),
        "ones": lambda: torch.ones(1, H),
        "mixed": lambda: torch.where(torch.arange(H) % 2 == 0, torch.zeros(H), rnd(H)),
    }[kind]()


def make_mask(kind: str, B: int, H: int, T: int, S: int, dtype) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind in ("bool", "bool_empty"):
        m = torch.rand(B, S) < 0.7
        m[:, 0] = True
        if kind == "bool_empty":
            m[-1] = False  # a fully padded row: zeros where the prompt has no weight
        return m
    heads = H if kind == "add_h" else 1
    m = torch.randn(B, heads, T, S).to(dtype)
    m[..., -1] = float("-inf")
    if kind == "add_hf":  # Hugging Face style: finfo.min on padding, a fully masked query row
        m = torch.zeros(B, heads, T, S, dtype=dtype)
        m[0, :, 0] = torch.finfo(dtype).min
    return m


def make_inputs(B, H, Hkv, T, S, P, Dh, Bp, gate, mask, dtype):
    scale = lambda t: t.to(dtype)
    q = scale(torch.randn(B, H, T, Dh))
    k, v = scale(torch.randn(B, Hkv, S, Dh)), scale(torch.randn(B, Hkv, S, Dh))
    pk, pv = scale(torch.randn(Bp, Hkv, P, Dh)), scale(torch.randn(Bp, Hkv, P, Dh))
    return [q, k, v, pk, pv, make_gate(gate, B, H)], make_mask(mask, B, H, T, S, dtype)


def _run(fn, tensors, mask, is_causal, grad_out, device="cpu"):
    leaves = [t.detach().to(device).requires_grad_() for t in tensors]
    mask = None if mask is None else mask.to(device)
    out = fn(*leaves, mask, is_causal)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device=device, dtype=out.dtype))
    return [out.detach().cpu()] + [g.cpu() for g in grads]


def _run_backend(backend, tensors, mask, is_causal, grad_out, small_blocks=True):
    with use_backend(backend), _blocks(backend, small_blocks):
        return _run(gated_prefix_attention, tensors, mask, is_causal, grad_out, device_for(backend))


def _check_against_reference(
    backend, tensors, mask, is_causal, dtype, small_blocks=True, factor=2.0, grad_out=None
):
    grad_out = torch.randn(tensors[0].shape) if grad_out is None else grad_out
    ours = _run_backend(backend, tensors, mask, is_causal, grad_out, small_blocks)
    m64 = None if mask is None else mask if mask.dtype == torch.bool else mask.double()
    ref64 = _run(reference, [t.double() for t in tensors], m64, is_causal, grad_out.double())
    same = _run(reference, tensors, mask, is_causal, grad_out.to(dtype))
    terms = _abs_term_scales(tensors, m64 if m64 is not None else mask, is_causal, grad_out, ref64[0])
    # 8 ulps of the absolute terms: each term is a product of computed factors (a probability from an
    # exponent, dP - delta, q or k) that carry a few ulps each.
    for name, a, r, s, t in zip(NAMES[:-1], ours, ref64, same, terms):
        assert_within_budget(a, r, s, name=f"{backend} {name}", factor=factor, ulps=8.0, term_scale=t)
    _assert_gate_grad_within_budget(
        ours[6], ref64, same[6], tensors, m64, is_causal, grad_out, backend, factor
    )
    return ours


def _abs_term_scales(tensors, mask64, is_causal, grad_out, out64) -> list[float]:
    """For out, dq, dk, dv, dprompt_key, dprompt_value: the largest sum of absolute terms behind one
    element (float64), e.g. ``sum_t |P_tj| (|dP_tj| + |delta_t|) |q_t| scale`` for dk, whose terms
    cancel (dP - delta) while the result may be small."""
    q, k, v, pk, pv, gate = (t.double() for t in tensors)
    B, H, T, Dh = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[2]
    rep, scale = H // Hkv, Dh**-0.5
    kk = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(rep, 1)
    vv = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(rep, 1)
    s = q @ kk.transpose(-1, -2) * scale
    key_bias = torch.zeros(B, 1, T, S, dtype=torch.float64)
    if mask64 is not None:
        if mask64.dtype == torch.bool:
            key_bias = key_bias.masked_fill(~mask64[:, None, None, :], float("-inf"))
        else:
            key_bias = key_bias + mask64
    if is_causal:
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        key_bias = key_bias.masked_fill(~causal, float("-inf"))
    g = gate.expand(B, H)[:, :, None, None]
    s = torch.cat([s[..., :P] + torch.log(g), s[..., P:] + key_bias], -1)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf")))
    go = grad_out.double()
    ds_abs = p * ((go @ vv.transpose(-1, -2)).abs() + (go * out64).sum(-1, keepdim=True).abs())

    def per_kv(t):  # [B, H, L, Dh] -> [B, Hkv, L, Dh], summing the query heads of a kv head
        return t.reshape(B, Hkv, rep, *t.shape[2:]).sum(2)

    dk_full = per_kv(ds_abs.transpose(-1, -2) @ q.abs() * scale)
    dv_full = per_kv(p.transpose(-1, -2) @ go.abs())
    prompt = (lambda t: t.sum(0, keepdim=True)) if pk.shape[0] == 1 else (lambda t: t)
    scales = [
        p @ vv.abs(),
        ds_abs @ kk.abs() * scale,
        dk_full[:, :, P:],
        dv_full[:, :, P:],
        prompt(dk_full[:, :, :P]),
        prompt(dv_full[:, :, :P]),
    ]
    return [t.max().item() if t.numel() else 0.0 for t in scales]


def _gate_term_scale(tensors, mask64, is_causal, grad_out, out64) -> float:
    """The size of the terms whose sum is dgate: sum_t sum_j |exp(s_tj - lse_t) (dP_tj - delta_t)|,
    per gate entry (float64). dgate cancels: its error scales with these terms, not with dgate."""
    q, k, _, pk, pv, gate = (t.double() for t in tensors)
    B, H, T, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep, scale = H // Hkv, Dh**-0.5
    kk = k.repeat_interleave(rep, 1)
    pkk, pvv = (t.expand(B, -1, -1, -1).repeat_interleave(rep, 1) for t in (pk, pv))
    sk = q @ kk.transpose(-1, -2) * scale
    if mask64 is not None:
        sk = (
            sk.masked_fill(~mask64[:, None, None, :], float("-inf"))
            if mask64.dtype == torch.bool
            else sk + mask64
        )
    if is_causal:
        sk = sk.masked_fill(torch.ones(T, S, dtype=torch.bool).tril(S - T).logical_not(), float("-inf"))
    sp = q @ pkk.transpose(-1, -2) * scale
    g = gate.expand(B, H)[:, :, None, None]
    lse = torch.logsumexp(torch.cat([sp + torch.log(g), sk], -1), -1, keepdim=True)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    go = grad_out.double()
    factor = go @ pvv.transpose(-1, -2) - (go * out64).sum(-1, keepdim=True)
    # exp(sp - lse) overflows on a row whose keys all carry finfo.min and whose prompt has gate 0;
    # such rows enter only with a zero grad_out (where d out / d gate is finite: 0).
    terms = torch.where(factor == 0, 0.0, torch.exp(sp - lse) * factor)
    per_bh = terms.abs().sum(dim=(2, 3))  # [B, H]
    g2 = (1,) * (2 - gate.dim()) + tuple(gate.shape)
    return per_bh.sum_to_size(g2).max().item() if terms.numel() else 0.0


def _assert_gate_grad_within_budget(
    actual, ref64, torch_same, tensors, mask64, is_causal, grad_out, backend, factor
):
    """assert_within_budget for dgate, with the ulps taken of the size of its (cancelling) terms, and
    16 of them: each term is exp(s - lse) (dP - delta), whose exponent carries an error of a few ulps
    of |s| + |lse|, and dgate sums T * P (and the broadcast dimensions') such terms."""
    assert not torch.isnan(actual).any(), f"{backend} gate: NaN"
    assert actual.shape == ref64[6].shape and actual.dtype == torch_same.dtype
    ours, theirs = max_err(actual, ref64[6]), max_err(torch_same, ref64[6])
    size = max(
        ref64[6].abs().max().item(), _gate_term_scale(tensors, mask64, is_causal, grad_out, ref64[0]), 1e-3
    )
    eps = torch.finfo(tensors[0].dtype).eps
    budget = factor * theirs + 16 * eps * size
    assert ours <= budget, (
        f"{backend} gate: error {ours:.3e} > budget {budget:.3e} (torch's own error {theirs:.3e})"
    )


# (B, H, Hkv, T, S, P, Dh, prompt batch, gate kind, mask kind, causal)
CASES = [
    (2, 4, 2, 20, 37, 5, 32, 1, "head", "bool", False),  # GQA, broadcast prompt, S not a block multiple
    (1, 2, 2, 1, 17, 1, 80, 1, "scalar", "none", True),  # T = 1, batch 1, P = 1, Dh padded 80 -> 128
    (2, 2, 1, 33, 18, 0, 32, 2, "batch", "add_h", True),  # P = 0, causal with T > S, per-head mask
    (2, 2, 2, 9, 21, 19, 32, 2, "bh", "add_1", True),  # causal T < S, per-batch prompt, P > block
    (2, 4, 2, 12, 10, 4, 32, 1, "mixed", "bool_empty", False),  # gate 0 on half the heads, empty row
    (2, 2, 2, 7, 9, 3, 32, 1, "one_elem", "add_hf", False),  # HF-style finfo.min additive mask
]
CASE_IDS = [
    f"B{c[0]}H{c[1]}kv{c[2]}T{c[3]}S{c[4]}P{c[5]}D{c[6]}-{c[8]}-{c[9]}-{'causal' if c[10] else 'full'}"
    for c in CASES
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [0, 5])
def test_hugging_face_layout_inputs(backend, P):
    """query, key and value as Hugging Face passes them: [B, H, T, Dh] views of [B, T, H, Dh]
    projections (not contiguous), with and without a prompt, GQA, causal."""
    B, H, Hkv, T, S, Dh = 2, 4, 2, 6, 6, 32
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 1, "head", "bool", torch.float32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:3])
    assert not q.is_contiguous() and not k.is_contiguous()
    _check_against_reference(backend, [q, k, v, *tensors[3:]], m, True, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_fp32(backend, case):
    B, H, Hkv, T, S, P, Dh, Bp, gate, mask, causal = case
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, Bp, gate, mask, torch.float32)
    _check_against_reference(backend, tensors, m, causal, torch.float32)


@pytest.mark.parametrize("mask_kind", ["bool", "add_h"])
def test_reference_check_fails_a_backend_that_drops_the_mask(mask_kind, monkeypatch):
    """The check itself: an answer computed without the mask fails it, for key-padding (bool) masks as
    for additive ones. (The float64 reference once ran bool-masked cases without their mask, and the
    budget, computed against it, swallowed the difference.)"""
    B, H, Hkv, T, S, P, Dh = 2, 4, 2, 6, 9, 3, 32
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 1, "head", mask_kind, torch.float32)
    unmasked = lambda backend, tensors, mask, *a, **k: _run(reference, tensors, None, *a[:2])
    monkeypatch.setattr(sys.modules[__name__], "_run_backend", unmasked)
    with pytest.raises(AssertionError):
        _check_against_reference("torch", tensors, m, False, torch.float32)


# (probabilities kept, block elements): the kept path runs in one block whatever the block size.
CPU_PATHS = [(True, 1 << 18), (False, 1 << 18), (False, 3000), (False, 40)]
CPU_PATH_IDS = ["saved_probs", "recomputed-one_block", "recomputed-batch_blocks", "recomputed-row_blocks"]


@pytest.mark.parametrize("saved,block", CPU_PATHS, ids=CPU_PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_path_blocks(case, saved, block, monkeypatch):
    """The CPU path's two float32 training paths: probabilities kept from the forward, or recomputed
    blockwise as for large problems (and fp16/bf16), forced at small sizes, in one block, in blocks of
    batch items and in blocks of query rows (forward and backward)."""
    op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
    monkeypatch.setattr(op_module, "_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(op_module, "_SAVE_PROBS_ELEMENTS", op_module._SAVE_PROBS_ELEMENTS if saved else 0)
    B, H, Hkv, T, S, P, Dh, Bp, gate, mask, causal = case
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, Bp, gate, mask, torch.float32)
    _check_against_reference("torch", tensors, m, causal, torch.float32)


LOW_CASES = [
    (2, 4, 2, 19, 23, 6, 64, 1, "head", "bool", True),
    (1, 2, 1, 5, 16, 3, 96, 1, "batch", "add_1", False),
]


@pytest.mark.parametrize("block", [3000, 40], ids=["batch_blocks", "row_blocks"])
def test_cpu_path_blocks_fp16(block, monkeypatch):
    """fp16 through the blockwise recomputing backward in several blocks (float32 accumulation of dk,
    dv across row blocks)."""
    op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
    monkeypatch.setattr(op_module, "_BLOCK_ELEMENTS", block)
    B, H, Hkv, T, S, P, Dh, Bp, gate, mask, causal = LOW_CASES[0]
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, Bp, gate, mask, torch.float16)
    _check_against_reference("torch", tensors, m, causal, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_CASES, ids=["D64-bool-causal", "D96-add"])
def test_matches_reference_low_precision(backend, dtype, case):
    if backend in ("triton", ROWS, LONG) and INTERPRET and dtype == torch.bfloat16:
        pytest.skip("bf16 under the Triton interpreter is numpy's weak emulation; run on a GPU to test it")
    B, H, Hkv, T, S, P, Dh, Bp, gate, mask, causal = case
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, Bp, gate, mask, dtype)
    _check_against_reference(backend, tensors, m, causal, dtype)


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter with the launcher's own blocks")
@pytest.mark.parametrize(
    "dtype,Dh,P", [(torch.float32, 64, 37), (torch.float16, 80, 9)], ids=["fp32-D64-P37", "fp16-D80"]
)
def test_triton_launcher_blocks(dtype, Dh, P):
    """The block sizes the launcher really uses (128 x 64 and friends) under the interpreter."""
    tensors, m = make_inputs(2, 2, 1, 70, 75, P, Dh, 1, "head", "add_1", dtype)
    _check_against_reference("triton", tensors, m, True, dtype, small_blocks=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p37_large_prompt(backend):
    """P = 37 prompt keys (three 16-key prompt blocks under the interpreter), GQA, per-head gate."""
    tensors, m = make_inputs(2, 4, 2, 11, 13, 37, 32, 1, "head", "bool", torch.float32)
    _check_against_reference(backend, tensors, m, False, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_zero_is_attention_without_prompts(backend):
    B, H, Hkv, T, S, P, Dh = 2, 4, 2, 10, 13, 5, 32
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 1, "zero", "bool_empty", torch.float32)
    grad_out = torch.randn(B, H, T, Dh)
    ours = _run_backend(backend, tensors, m, True, grad_out)
    no_prompt = [t[:, :, :0] if i in (3, 4) else t for i, t in enumerate(tensors)]
    plain = _run_backend(backend, no_prompt, m, True, grad_out)
    assert torch.equal(ours[0], plain[0]), "gate 0 must give exactly the attention without prompts"
    assert not ours[0].isnan().any()
    assert ours[0][-1].abs().max() == 0, "a fully padded row without prompt weight gives zeros"
    for i in (1, 2, 3):
        torch.testing.assert_close(ours[i], plain[i], rtol=1e-5, atol=1e-6)
    assert ours[4].abs().max() == 0 and ours[5].abs().max() == 0, "no weight on the prompt: zero grads"
    # d out / d gate at gate = 0 is finite and equals the float64 reference's.
    m64 = m
    ref = _run(reference, [t.double() for t in tensors], m64, True, grad_out.double())
    assert torch.isfinite(ours[6]).all() and ref[6].abs().item() > 0
    torch.testing.assert_close(ours[6].double(), ref[6], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_one_is_attention_over_concatenation(backend):
    B, H, Hkv, T, S, P, Dh = 2, 4, 2, 9, 12, 6, 32
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 2, "ones", "bool", torch.float32)
    with use_backend(backend), _blocks(backend):
        dev = device_for(backend)
        out = gated_prefix_attention(*[t.to(dev) for t in tensors], m.to(dev)).cpu()
    q, k, v, pk, pv, _ = tensors
    bias = torch.zeros(B, 1, 1, P + S).masked_fill(
        ~torch.cat([torch.ones(B, P, dtype=torch.bool), m], 1)[:, None, None], -math.inf
    )
    expect = F.scaled_dot_product_attention(
        q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=bias, enable_gqa=True
    )
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend):
    """Every key padded in one batch row: zeros and zero gradients without prompt weight (P = 0 or
    gate 0); the prompt alone where the gate is positive. Never NaN."""
    B, H, T, S, Dh = 2, 2, 6, 7, 32
    m = torch.ones(B, S, dtype=torch.bool)
    m[0] = False
    for P, gate in ((0, "head"), (4, "zero"), (4, "head")):
        tensors, _ = make_inputs(B, H, H, T, S, P, Dh, 1, gate, "none", torch.float32)
        res = _run_backend(backend, tensors, m, False, torch.randn(B, H, T, Dh))
        for name, r in zip(NAMES, res):
            assert not r.isnan().any(), f"NaN in {name} (P={P}, gate={gate})"
        if P == 0 or gate == "zero":
            assert res[0][0].abs().max() == 0 and res[1][0].abs().max() == 0
        else:
            ref = reference(*tensors, m)
            torch.testing.assert_close(res[0], ref, rtol=1e-5, atol=1e-5)
            assert res[0][0].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_finfo_min_padding_is_not_masking(backend):
    """Hugging Face pads additive masks with finfo.min, which is finite: a query row padded that way
    everywhere (and no prompt weight: gate 0) averages the values uniformly, like attention without
    prompts (the contract: gate 0 is exactly that); -inf instead masks the row (zeros). The reference
    agrees, with the prompt and without it."""
    B, H, T, S, Dh = 1, 2, 4, 6, 32
    tensors, _ = make_inputs(B, H, H, T, S, 3, Dh, 1, "zero", "none", torch.float32)
    m = torch.zeros(B, 1, T, S)
    m[0, 0, 1] = torch.finfo(torch.float32).min
    m[0, 0, 2] = float("-inf")
    with use_backend(backend), _blocks(backend):
        out = gated_prefix_attention(
            *[t.to(device_for(backend)) for t in tensors], m.to(device_for(backend))
        ).cpu()
    v = tensors[2]
    torch.testing.assert_close(out[0, :, 1], v[0].mean(dim=1), rtol=1e-5, atol=1e-5)
    assert out[0, :, 2].abs().max() == 0
    no_prompt = [t[:, :, :0] if i in (3, 4) else t for i, t in enumerate(tensors)]
    torch.testing.assert_close(out, reference(*no_prompt, m), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference(*tensors, m), rtol=1e-5, atol=1e-5)


def hf_causal_mask(B, T, S, dtype, left_pad) -> torch.Tensor:
    """The additive mask transformers builds for a causal LM with left padding: finfo(dtype).min on
    the padded keys and above the (bottom-right) diagonal, 0 elsewhere, [B, 1, T, S]. A query row
    whose visible keys are all padding (t < left_pad[b] when T == S) has every key at finfo.min."""
    t, s = torch.arange(T)[:, None], torch.arange(S)[None, :]
    hidden = [(s > t + S - T) | (s < n) for n in left_pad]
    return torch.stack([torch.zeros(T, S).masked_fill(h, torch.finfo(dtype).min) for h in hidden])[
        :, None
    ].to(dtype)


# (query dtype, mask dtype): transformers builds the mask in the model's dtype. fp32 queries with a
# bf16 mask: bf16's finfo.min in float32, as huge as fp32's (and bf16 runs on CPU only under the
# interpreter). fp16's finfo.min, -65504, is not absorbed: softmax of the scores there.
HF_MASK_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]
HF_MASK_IDS = ["fp32-fp32mask", "fp32-bf16mask", "fp16-fp16mask", "bf16-bf16mask"]


@pytest.mark.parametrize("backend", ["torch", "torch_recompute", "triton", ROWS, LONG])
@pytest.mark.parametrize("dtypes", HF_MASK_DTYPES, ids=HF_MASK_IDS)
@pytest.mark.parametrize("P,gate", [(0, "head"), (3, "zero"), (3, "mixed")], ids=["P0", "gate0", "mixed"])
def test_hf_min_mask_fully_masked_rows_backward(backend, dtypes, P, gate, monkeypatch):
    """Hugging Face pads additive masks with finfo.min (finite): a query row whose keys all carry it
    and whose prompt has no weight (P = 0 or gate 0) is softmax over equal scores, uniform over its
    keys, in value AND gradient (as softmax of the biased scores in float64 gives). Every gradient,
    dgate included, against float64; with gate 0 those rows' grad_out is 0 (as transformers' padded
    positions get), where d out / d gate is 0, not 0 * inf. ``torch_recompute``: the CPU path's
    blockwise backward from the log-sum-exp (what fp16/bf16 and large float32 calls run)."""
    qdt, mdt = dtypes
    if backend in ("triton", ROWS, LONG) and INTERPRET and qdt == torch.bfloat16:
        pytest.skip("bf16 under the Triton interpreter is numpy's weak emulation; run on a GPU to test it")
    if backend == "torch_recompute":
        op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
        monkeypatch.setattr(op_module, "_SAVE_PROBS_ELEMENTS", 0)
        monkeypatch.setattr(op_module, "_BLOCK_ELEMENTS", 150)  # several row blocks
        backend = "torch"
    B, H, Hkv, T, S, Dh = 2, 4, 2, 7, 7, 32
    tensors, _ = make_inputs(B, H, Hkv, T, S, P, Dh, 1, gate, "none", qdt)
    m = hf_causal_mask(B, T, S, mdt, left_pad=(3, 0))  # rows 0-2 of batch 0 see only padding
    m[1, :, 4] = torch.finfo(mdt).min  # and one fully masked row in the middle of batch 1
    dead_rows = torch.zeros(B, 1, T, 1, dtype=torch.bool)
    dead_rows[0, :, :3] = dead_rows[1, :, 4] = True
    grad_out = torch.randn(B, H, T, Dh)
    if P > 0:
        gate_zero = (tensors[5].expand(B, H) == 0)[:, :, None, None]
        grad_out = grad_out.masked_fill(dead_rows & gate_zero, 0.0)
    ours = _check_against_reference(backend, tensors, m, False, qdt, grad_out=grad_out)
    if mdt != torch.float16:  # (fp16's finfo.min is not absorbed: softmax of the scores there)
        v = tensors[2].float().repeat_interleave(H // Hkv, 1)
        g = tensors[5].expand(B, H)
        for b, t in ((0, 0), (0, 2), (1, 4)):
            for h in range(H):
                if P == 0 or g[b, h] == 0:  # no weight anywhere but on the padded keys: their mean
                    torch.testing.assert_close(ours[0][b, h, t].float(), v[b, h].mean(0), **_tol(qdt))


def _tol(dtype) -> dict:
    return {torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("forward,backward", [("triton", "torch"), ("torch", "triton")])
@pytest.mark.parametrize("P,gate", [(0, "head"), (3, "mixed")], ids=["P0", "mixed"])
def test_hf_min_mask_backward_on_another_backend(forward, backward, P, gate, monkeypatch):
    """The saved log-sum-exp of rows with every key at finfo.min means the same on every backend."""
    op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
    monkeypatch.setattr(op_module, "_SAVE_PROBS_ELEMENTS", 0)  # the CPU backward from the lse
    B, H, Hkv, T, S, Dh = 2, 2, 1, 6, 6, 32
    tensors, _ = make_inputs(B, H, Hkv, T, S, P, Dh, 1, gate, "none", torch.float32)
    m = hf_causal_mask(B, T, S, torch.float32, left_pad=(2, 4))
    grad_out = torch.randn(B, H, T, Dh)
    if P > 0:
        gate_zero = (tensors[5].expand(B, H) == 0)[:, :, None, None]
        grad_out[:, :, :4] = grad_out[:, :, :4].masked_fill(gate_zero, 0.0)
    leaves = [t.clone().requires_grad_() for t in tensors]
    with use_backend(forward), _blocks(forward):
        out = gated_prefix_attention(*leaves, m)
    with use_backend(backward), _blocks(backward):
        grads = torch.autograd.grad(out, leaves, grad_out)
    ref = _run(reference, [t.double() for t in tensors], m.double(), False, grad_out.double())
    torch.testing.assert_close(out.detach().double(), ref[0], rtol=1e-5, atol=1e-5)
    for name, g, r in zip(NAMES[1:], grads, ref[1:]):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_prompt_gradients_are_summed(backend):
    B, H, T, S, P, Dh = 3, 2, 5, 6, 4, 32
    tensors, m = make_inputs(B, H, H, T, S, P, Dh, 1, "batch", "bool", torch.float32)
    grad_out = torch.randn(B, H, T, Dh)
    shared = _run_backend(backend, tensors, m, False, grad_out)
    expanded = [t.expand(B, -1, -1, -1).contiguous() if i in (3, 4) else t for i, t in enumerate(tensors)]
    per_batch = _run_backend(backend, expanded, m, False, grad_out)
    assert shared[4].shape == (1, H, P, Dh)
    torch.testing.assert_close(shared[0], per_batch[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shared[4], per_batch[4].sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[5], per_batch[5].sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_backward_on_another_backend():
    """The saved log-sum-exp has one convention: a triton forward with a torch backward is right."""
    tensors, m = make_inputs(2, 2, 1, 8, 9, 3, 32, 1, "mixed", "bool_empty", torch.float32)
    leaves = [t.clone().requires_grad_() for t in tensors]
    with use_backend("triton"), _blocks("triton"):
        out = gated_prefix_attention(*leaves, m, True)
    grad_out = torch.randn(out.shape)
    with use_backend("torch"):
        grads = torch.autograd.grad(out, leaves, grad_out)
    ref = _run(reference, [t.double() for t in tensors], m, True, grad_out.double())
    for name, g, r in zip(NAMES[1:], grads, ref[1:]):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("for_backward", [True, False], ids=["kept", "not_kept"])
def test_gradient_layout(backend, dtype, for_backward):
    """The backward op's fake promises dq, dk, dv in :func:`grad_layout`'s layout on every backend:
    contiguous after a CPU forward that kept the probabilities, heads-last ([N, rows, heads, Dh]
    storage) otherwise; the fake agrees with the real op."""
    tensors, m = make_inputs(2, 4, 2, 6, 7, 3, 32, 1, "head", "bool", dtype)
    dev = device_for(backend)
    tensors, m = [t.to(dev) for t in tensors], m.to(dev)
    with use_backend(backend), _blocks(backend):
        out, *saved = _gpa_op(*tensors, m, False, 32**-0.5, for_backward)
        bargs = (torch.randn(out.shape, device=dev, dtype=dtype), *tensors, m, out, *saved, False, 32**-0.5)
        grads = _gpa_backward_op(*bargs)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fakes = _gpa_backward_op(*bargs)
    assert all(type(f).__name__ == "FakeTensor" for f in fakes)
    kept = backend == "torch" and dtype == torch.float32 and for_backward
    assert grad_layout(saved[1]) == ("contiguous" if kept else "heads_last")
    for g, f, t in zip(grads[:3], fakes[:3], tensors[:3]):
        expect = t.contiguous().stride() if kept else heads_last_strides(t.shape)
        assert g.stride() == f.stride() == expect
    assert all(g.is_contiguous() for g in grads[3:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("P", [0, 3])
def test_cpu_inference_runs_outside_the_custom_op(dtype, P, monkeypatch):
    """Eager inference on CPU calls the CPU path directly (no custom-op dispatch, no copy of out):
    same values as the op, out laid out as ATen's SDPA lays out its own output."""
    tensors, m = make_inputs(2, 4, 2, 6, 7, P, 32, 1, "head", "bool", dtype)
    op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
    with use_backend("torch"), torch.no_grad():
        via_op = _gpa_op(*tensors, m, False, 32**-0.5, False)[0]
        calls = []
        monkeypatch.setattr(op_module, "_gpa_op", lambda *a: calls.append(1) or _gpa_op(*a))
        out = gated_prefix_attention(*tensors, m)
        k, v = (torch.cat([p.expand(2, -1, -1, -1), t], 2) for p, t in zip(tensors[3:5], tensors[1:3]))
        sdpa = F.scaled_dot_product_attention(tensors[0], k, v, enable_gqa=True)
    assert calls == []
    torch.testing.assert_close(out, via_op, rtol=0, atol=0)
    assert out.stride() == sdpa.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "T,S,P,gate,mask,causal",
    [
        (1, 13, 1, "bh", "none", False),
        (1, 40, 5, "mixed", "bool_empty", False),
        (3, 17, 4, "zero", "bool_empty", False),
        (2, 33, 3, "head", "add_hf", False),
        (1, 21, 2, "scalar", "add", False),
        (3, 29, 5, "batch", "bool", True),
    ],
)
def test_cpu_decoding_inference_merges_two_segments(dtype, T, S, P, gate, mask, causal, monkeypatch):
    """Few queries over many keys (a generation step): the inference path attends to the prompt and to
    the keys separately and merges the two by log-sum-exp instead of copying the cache behind the
    prompt. Same values (within the error budget) as the float64 reference, dead rows included."""
    B, H, Hkv, Dh = 3, 4, 2, 32
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 1, gate, mask, dtype)
    op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
    used = []
    real = op_module._cpu_forward_two_segments
    monkeypatch.setattr(op_module, "_cpu_forward_two_segments", lambda *a: used.append(1) or real(*a))
    with torch.no_grad():
        out = gated_prefix_attention(*tensors, m, is_causal=causal)
        m64 = None if m is None else m if m.dtype == torch.bool else m.double()
        ref64 = reference(*[t.double() for t in tensors], m64, is_causal=causal)
        same = reference(*tensors, m, is_causal=causal)
    assert used == [1]
    assert_within_budget(out, ref64, same, name="out")


def test_cpu_forward_keeps_probabilities_only_for_a_backward():
    """float32 on CPU: the probabilities come back (for the backward) only when asked for."""
    B, H, T, S, P, Dh = 2, 2, 5, 7, 3, 32
    tensors, m = make_inputs(B, H, H, T, S, P, Dh, 1, "head", "bool", torch.float32)
    with use_backend("torch"):
        out_a, lse_a, *kept_a = _gpa_op(*tensors, m, False, Dh**-0.5, False)
        out_b, lse_b, probs_b, keys_b, values_b, scores_b = _gpa_op(*tensors, m, False, Dh**-0.5, True)
    assert all(t.numel() == 0 for t in kept_a)
    assert probs_b.shape == (B, H, T, P + S)
    q, k, v, pk, pv = tensors[:5]
    torch.testing.assert_close(scores_b, q @ pk.transpose(-1, -2) * Dh**-0.5)
    torch.testing.assert_close(keys_b, torch.cat([pk.expand(B, -1, -1, -1), k], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values_b, torch.cat([pv.expand(B, -1, -1, -1), v], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)  # two algorithms (flash, GEMM)
    torch.testing.assert_close(lse_a, lse_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs_b.sum(-1), torch.ones(B, H, T))


# ----------------------------------------------------------------------------------------------
# Index arithmetic and grids at sizes that cannot be allocated in a test

# Compiles some of the kernels for sm_90 in a fresh interpreter (the test session's Triton runs under
# TRITON_INTERPRET=1, whose @jit helpers cannot be compiled) and prints their TTIR as JSON.
_TTIR_CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prompt_kernels.kernels import gated_prefix_attention as gpa

wanted, out = json.loads(sys.argv[1]), {}
for spec in gpa._compile_specs():
    key = next((w for w in wanted if spec.name.startswith(w)), None)
    if key is None or key in out:
        continue
    src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
    options = {"num_warps": spec.num_warps}
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    out[key] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ttir"]
print(json.dumps(out))
"""

_TTIR_KERNELS = [
    "gpa_fwd[fp16,Dh=64,mask=add,causal=1",
    "gpa_bwd_preprocess[fp16,Dh=64",
    "gpa_bwd_dkdv[fp16,Dh=64,mask=add,causal=1",
    "gpa_bwd_dq[fp16,Dh=64,mask=add,causal=1",
    "gpa_bwd_fused[fp16,Dh=64,mask=add,causal=1",
    "gpa_bwd_rows[fp16,Dh=64,mask=add,causal=1",
]
_SSA = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*)$")


def _i32_products_of_strides(ttir: str) -> list[str]:
    """The ``arith.muli`` of 32-bit integers in a TTIR function one of whose operands is (a splat,
    broadcast or reshape of) a stride argument or ``T``: element offsets that wrap around at 2^31."""
    head = re.search(r"tt\.func public @\w+\((.*?)\) attributes", ttir, re.S)
    assert head, "no kernel signature in the TTIR"
    args = dict(re.findall(r"(%\w+): (\w+)", head.group(1)))
    watched = {a for a, ty in args.items() if ty == "i32" and (a == "%T" or a.startswith("%s"))}
    defs = {}
    for line in ttir.splitlines():
        m = _SSA.match(line)
        if m:
            name, op, rest = m.groups()
            body, _, ty = rest.split(" loc(")[0].rpartition(" : ")
            defs[name] = (op, re.findall(r"%[\w.]+", body), ty)

    def source(v):
        while v in defs and defs[v][0] in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape"):
            v = defs[v][1][0]
        return v

    bad = []
    for name, (op, operands, ty) in defs.items():
        if (
            op == "arith.muli"
            and (ty == "i32" or ty.endswith("xi32>"))
            and any(source(o) in watched for o in operands)
        ):
            bad.append(f"{name} = muli {', '.join(operands)} : {ty}")
    return bad


def test_offsets_are_64_bit():
    """Every element offset that scales a stride (head * head stride, row * row stride, of q, k, v,
    the prompt, the outputs, the gradients and an additive [B, H, T, S] mask) is computed in 64 bits:
    one batch item's H x T x Dh, or a mask's H x T x S, may exceed 2^31. Checked on the kernels as
    compiled for sm_90 (their TTIR), since such tensors do not fit a test."""
    root = Path(gpa_kernels_file()).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-c", _TTIR_CHILD, json.dumps(_TTIR_KERNELS)],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ttirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(ttirs) == sorted(_TTIR_KERNELS)
    # The check itself: the unfixed pattern (h * head stride in 32 bits) is what it finds.
    assert _i32_products_of_strides(
        "tt.func public @k(%Q: !tt.ptr<f16>, %sqh: i32, %T: i32) attributes {} {\n"
        "  %h = tt.get_program_id y : i32 loc(#l)\n  %o = arith.muli %h, %sqh : i32 loc(#l)\n"
        "  %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32> loc(#l)\n"
        "  %t = tt.splat %T : i32 -> tensor<16xi32> loc(#l)\n  %u = arith.muli %r, %t : tensor<16xi32> loc(#l)\n"
    ) == ["%o = muli %h, %sqh : i32", "%u = muli %r, %t : tensor<16xi32>"]
    found = {name: _i32_products_of_strides(ttir) for name, ttir in ttirs.items()}
    assert not any(found.values()), f"32-bit products of strides: {found}"


def gpa_kernels_file() -> str:
    spec = importlib.util.find_spec("prompt_kernels.kernels.gated_prefix_attention")
    return spec.origin


class _GridRecorder:
    """Stands in for a @triton.jit kernel: records the grid of each launch, launches nothing."""

    def __init__(self, name: str, grids: list):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append((self.name, tuple(grid), kwargs))


@pytest.mark.parametrize("path", ["fused", "rows", "three-launch"])
@pytest.mark.parametrize("heads", [(35_000, 35_000), (70_000, 1)], ids=["H35000-Hkv35000", "H70000-Hkv1"])
def test_grids_within_cuda_limits(heads, path, monkeypatch):
    """B * H = 70,000 (over CUDA's 65,535 on grid axes y and z): every launch of the forward and the
    backward stays within CUDA's grid limits and still has a program for every (query block, batch,
    head) (key block, batch, kv head; the forward: block of the group's packed query rows, batch, kv
    head). The launchers run with the kernels replaced by recorders."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    grids = []
    for name in (
        "_gpa_fwd_kernel",
        "_gpa_bwd_preprocess_kernel",
        "_gpa_bwd_dkdv_kernel",
        "_gpa_bwd_dq_kernel",
        "_gpa_bwd_fused_kernel",
        "_gpa_bwd_rows_kernel",
    ):
        monkeypatch.setattr(gk, name, _GridRecorder(name, grids))
    # (S = 2, P = 1: the fused backward applies; T = 3, a group of 1: the rows backward too)
    monkeypatch.setattr(gk, "_short_path", path == "fused")
    monkeypatch.setattr(gk, "_rows_path", path == "rows")
    (H, Hkv), B, T, S, P, Dh = heads, 2, 3, 2, 1, 32
    q = torch.randn(B, H, T, Dh)
    k, v = torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)
    pk, pv = torch.randn(1, Hkv, P, Dh), torch.randn(1, Hkv, P, Dh)
    gate, mask = torch.rand(H), torch.zeros(B, H, T, S)
    out, lse = gk.forward(q, k, v, pk, pv, gate, mask, True, 0.1)
    gk.backward(torch.ones_like(out), q, k, v, pk, pv, gate, mask, out, lse, True, 0.1)
    if path == "rows" and gk.rows_tile(gk.DEFAULT_ARCH, q.dtype, Dh, H // Hkv * T) is None:
        path = "three-launch"  # (a group of 70,000 heads: its rows fit no block)
    assert {g[0] for g in grids} == {
        "fused": {"_gpa_fwd_kernel", "_gpa_bwd_fused_kernel"},
        "rows": {"_gpa_fwd_kernel", "_gpa_bwd_rows_kernel"},
        "three-launch": {
            "_gpa_fwd_kernel",
            "_gpa_bwd_preprocess_kernel",
            "_gpa_bwd_dkdv_kernel",
            "_gpa_bwd_dq_kernel",
        },
    }[path]
    for name, grid, kwargs in grids:
        assert 1 <= len(grid) <= 3, (name, grid)
        limits = (2**31 - 1, 65_535, 65_535)
        assert all(0 < n <= lim for n, lim in zip(grid, limits)), f"{name}: grid {grid} over CUDA's limits"
        heads_here = (
            Hkv
            if name
            in ("_gpa_fwd_kernel", "_gpa_bwd_dkdv_kernel", "_gpa_bwd_fused_kernel", "_gpa_bwd_rows_kernel")
            else H
        )
        assert math.prod(grid) >= B * heads_here, f"{name}: grid {grid} has fewer programs than heads"
        if name == "_gpa_fwd_kernel":  # (blocks of the group's packed query rows, per (b, kv head))
            assert math.prod(grid) == -(-T * H // Hkv // kwargs["BLOCK_M"]) * B * Hkv, (grid, kwargs)


class _OpRecorder(TorchDispatchMode):
    """Records the ATen ops that compute something (not allocations, views or metadata)."""

    QUIET = frozenset(
        "empty empty_strided detach expand transpose view select slice unsqueeze alias t as_strided".split()
    )

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in self.QUIET:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("Bp", [2, 1], ids=["prompt-per-batch", "prompt-broadcast"])
@pytest.mark.parametrize("gate_shape", [(2, 4), (), (4,)], ids=["gate-bh", "gate-scalar", "gate-head"])
def test_backward_launches(Bp, gate_shape, monkeypatch):
    """The Triton backward is three launches (preprocess, dk/dv over the prompt and key blocks, dq)
    and no other device op: dgate is reduced on the device in the gate's own shape (zeroed by the
    preprocess, atomically added by the dk/dv launch; no [B, H] copy of a float32 gate, no host sum
    over its broadcast dimensions), the prompt's dk/dv blocks are programs of the key dk/dv launch;
    only a broadcast prompt adds two reductions over the batch (dprompt_key, dprompt_value). The
    forward is one launch. (Launchers with recording stand-ins for the kernels.)"""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    grids = []
    for name in (
        "_gpa_fwd_kernel",
        "_gpa_bwd_preprocess_kernel",
        "_gpa_bwd_dkdv_kernel",
        "_gpa_bwd_dq_kernel",
    ):
        monkeypatch.setattr(gk, name, _GridRecorder(name, grids))
    B, H, Hkv, T, S, P, Dh = 2, 4, 2, 40, 70, 19, 64
    q = torch.randn(B, H, T, Dh, dtype=torch.float16)
    k, v = (torch.randn(B, Hkv, S, Dh, dtype=torch.float16) for _ in range(2))
    pk, pv = (torch.randn(Bp, Hkv, P, Dh, dtype=torch.float16) for _ in range(2))
    gate, out, lse = (
        torch.rand(gate_shape),
        torch.randn(B, H, T, Dh, dtype=torch.float16),
        torch.randn(B, H, T),
    )
    grad_out = torch.ones_like(out)
    rec = _OpRecorder()
    with rec:
        gk.forward(q, k, v, pk, pv, gate, None, False, 0.1)
        *_, dgate = gk.backward(grad_out, q, k, v, pk, pv, gate, None, out, lse, False, 0.1)
    assert [g[0] for g in grids] == [
        "_gpa_fwd_kernel",
        "_gpa_bwd_preprocess_kernel",
        "_gpa_bwd_dkdv_kernel",
        "_gpa_bwd_dq_kernel",
    ]
    BN = gk.configs(torch.float16, Dh)["dkdv"][1]
    BNP = min(BN, gk.PROMPT_BLOCK_N)
    assert grids[2][1] == (((P + BNP - 1) // BNP + (S + BN - 1) // BN) * B * Hkv,)
    assert dgate.shape == (1,) * (2 - gate.dim()) + tuple(gate.shape)
    device_ops = [op for op in rec.ops if op != "fill_"]  # (fill_: the tests' NaN poisoning of outputs)
    assert device_ops == ([] if Bp == B else ["sum", "sum"]), rec.ops


def test_dkdv_tiles_per_arch():
    """sm_90 launches dk/dv tiles of at least 64 keys at fp16/bf16, every candidate (wgmma's 64 rows:
    the keys are the M dimension of every dk/dv tl.dot), and the compile specs register the fixed tile
    each arch launches in every variant at Dh 64 (python_tests/test_tools.py checks every candidate)."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    specs = {s.name: s for s in gk._compile_specs() if s.name.startswith("gpa_bwd_dkdv[")}
    for dtype in (torch.float16, torch.bfloat16):
        for Dh in gk.HEAD_DIMS:
            for arch in gk.ARCHS:
                for c in gk.candidates("dkdv", arch, dtype, Dh):
                    assert c.kwargs["BLOCK_N"] >= (64 if arch >= 90 else 32), (dtype, Dh, arch, c)
                    assert c.kwargs["BLOCK_NP"] == min(c.kwargs["BLOCK_N"], gk.PROMPT_BLOCK_N)
                BM, BN = gk.configs(dtype, Dh, arch)["dkdv"][:2]
                ty = gk._TRITON_TYPE[dtype]
                variants = gk.VARIANTS_DH64 if Dh == 64 else gk.VARIANTS_DH64[:1]
                for kind, causal in variants:
                    mask = ("none", "bool", "add")[kind]
                    name = f"gpa_bwd_dkdv[{ty},Dh={Dh},mask={mask},causal={int(causal)},BM={BM},BN={BN}]"
                    assert name in specs and arch in (specs[name].archs or gk.ARCHS), name
                    assert specs[name].constexprs["BLOCK_NP"] == min(BN, gk.PROMPT_BLOCK_N)


def _record_kernels(gk, monkeypatch) -> list:
    grids = []
    for name in gk._ALL_KERNEL_NAMES.values():
        monkeypatch.setattr(gk, name, _GridRecorder(name, grids))
    return grids


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's launch configuration")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("Dh", [32, 64, 96])
def test_interpreter_launches_the_first_candidate(dtype, Dh, monkeypatch):
    """Under the interpreter every kernel launches the first candidate of the default row (sm_80's row,
    the fixed tiles), deterministically, and no autotuner is built, also where the table offers more
    candidates to autotune on a GPU."""
    from prompt_kernels.kernels import gated_prefix_attention as gk
    from prompt_kernels.kernels import registry

    monkeypatch.setattr(gk, "_tuned", {})
    grids = _record_kernels(gk, monkeypatch)
    monkeypatch.setattr(gk, "_rows_path", False)  # (the three launches' candidates; rows: one tile)
    B, H, Hkv, T, S, P = 2, 4, 2, 40, 70, 19
    q = torch.randn(B, H, T, Dh, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, Dh, dtype=dtype) for _ in range(2))
    pk, pv = (torch.randn(1, Hkv, P, Dh, dtype=dtype) for _ in range(2))
    gate, out, lse = torch.rand(H), torch.randn(B, H, T, Dh, dtype=dtype), torch.randn(B, H, T)
    assert registry.launch_arch(q.device) == registry.DEFAULT_ARCH
    for _ in range(2):
        gk.forward(q, k, v, pk, pv, gate, None, True, 0.1)
        gk.backward(torch.ones_like(out), q, k, v, pk, pv, gate, None, out, lse, True, 0.1)
    assert [g[0] for g in grids] == [gk._KERNEL_NAMES[n] for n in ("fwd", "pre", "dkdv", "dq")] * 2
    for (_, _, kwargs), kernel in zip(grids, ("fwd", "pre", "dkdv", "dq") * 2, strict=True):
        first = gk.candidates(kernel, registry.DEFAULT_ARCH, dtype, Dh)[0]
        assert first == gk.candidates(kernel, 80, dtype, Dh)[0], kernel
        assert {k: kwargs[k] for k in first.kwargs} == first.kwargs, (kernel, kwargs)
        assert (kwargs["num_warps"], kwargs.get("num_stages")) == (first.num_warps, first.num_stages)
    assert all(not t.tuners for t in gk._tuned.values()), "an autotuner was built under the interpreter"
    if dtype == torch.float16 and Dh == 64:  # the table offers more than the fixed tile: a real choice
        assert len(gk.candidates("fwd", registry.DEFAULT_ARCH, dtype, Dh)) > 1
        assert len(gk.candidates("dq", registry.DEFAULT_ARCH, dtype, Dh)) > 1


@pytest.mark.skipif(not INTERPRET, reason="runs the autotuner's GPU path under the interpreter")
def test_autotuned_launches_are_right_on_every_trial(monkeypatch):
    """The GPU path (autotune), run under the interpreter with a stand-in timer and small test tiles:
    every candidate of the forward, dk/dv and dq is benchmarked on the real arguments and the fastest
    launched; the values equal the fixed path's. dk/dv atomically adds dgate into the tensor the
    preprocess zeroed: its autotuner resets it to zero before every trial and before the final launch
    (reset_to_zero), without which dgate comes out (trials + 1) times too large. The pick is cached per
    length bucket: a second call does not benchmark, a length in another bucket does."""
    from prompt_kernels.kernels import gated_prefix_attention as gk
    from prompt_kernels.kernels import registry

    small = {
        "fwd": ((16, 16, 4, None), (32, 16, 4, None)),
        "pre": ((16, 16, 4, None),),
        "dkdv": ((16, 16, 4, None), (16, 32, 4, None), (32, 16, 4, None)),
        "dq": ((16, 32, 4, None), (16, 16, 4, None)),
    }
    monkeypatch.setattr(
        gk, "candidates", lambda kernel, arch, dtype, hd: tuple(gk._tile(kernel, *t) for t in small[kernel])
    )
    ran = []

    def bench(fn, quantiles=None):
        fn()
        ran.append(len(ran))
        return [10.0 - len(ran)] * 3  # the last candidate is the fastest

    monkeypatch.setattr(gk, "_short_path", False)  # (the fused backward has one tile: never autotuned)
    monkeypatch.setattr(gk, "_rows_path", False)
    B, H, Hkv, P, Dh = 2, 4, 2, 19, 32
    tensors, _ = make_inputs(B, H, Hkv, 40, 37, P, Dh, 1, "head", "none", torch.float32)
    q, k, v, pk, pv, gate = tensors

    def run(q, k, v):
        out, lse = gk.forward(q, k, v, pk, pv, gate, None, True, 0.125)
        return (out, *gk.backward(torch.ones_like(out), q, k, v, pk, pv, gate, None, out, lse, True, 0.125))

    monkeypatch.setattr(gk, "_tuned", {})
    fixed = run(q, k, v)
    assert not ran and all(not t.tuners for t in gk._tuned.values())

    monkeypatch.setattr(gk, "_do_bench", bench)
    monkeypatch.setattr(gk, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(registry, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(gk, "_tuned", {})
    tuned = run(q, k, v)
    assert len(ran) == 2 + 3 + 2  # every candidate of fwd, dk/dv and dq once; the preprocess: one tile
    for a, b, name in zip(tuned, fixed, ("out", "dq", "dk", "dv", "dpk", "dpv", "dgate"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    picks = {key[0]: tk.tuners for key, tk in gk._tuned.items() if tk.tuners}
    assert set(picks) == {"fwd", "dkdv", "dq"}
    (dkdv_tuner,) = picks["dkdv"].values()
    assert dkdv_tuner.reset_to_zero == ["DGATE"] and dkdv_tuner.best_config.kwargs["BLOCK_M"] == 32
    assert all(not t.reset_to_zero for n in ("fwd", "dq") for t in picks[n].values())

    run(q, k, v)
    assert len(ran) == 7  # cached: same lengths, same key
    run(q[:, :, :33], k[:, :, :36], v[:, :, :36])
    assert len(ran) == 7  # T 33, S 36: the same power-of-two bucket (64, 64)
    run(q[:, :, :30], k, v)
    assert len(ran) == 14  # T 30: bucket 32, tuned again

    # without reset_to_zero every benchmarked trial adds its dgate terms once more
    monkeypatch.setattr(gk, "_RESET_TO_ZERO", {})
    monkeypatch.setattr(gk, "_tuned", {})
    wrong = run(q, k, v)[-1]
    torch.testing.assert_close(wrong, 4 * fixed[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="counts calls of a @triton.jit helper under the interpreter")
@pytest.mark.parametrize("T,S,causal", [(40, 56, True), (56, 40, True), (33, 48, False), (40, 40, False)])
def test_unmasked_fast_path(T, S, causal, monkeypatch):
    """Without a padding/additive mask, key blocks that every query of the block sees (below the
    causal diagonal, inside S) skip the mask/causal ``where``s in the forward, dk/dv and dq: fewer
    masked blocks, the same values bit for bit as all blocks masked (several 16-key blocks,
    bottom-right causality with T != S), and the reference's values."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    monkeypatch.setattr(gk, "_short_path", False)  # (the fast path is the three-launch backward's)
    monkeypatch.setattr(gk, "_rows_path", False)
    tensors, mask = make_inputs(1, 4, 2, T, S, 5, 32, 1, "head", "none", torch.float32)
    grad_out = torch.randn(tensors[0].shape)
    calls = [0]

    def counting(masked):
        def helper(*args, **kwargs):
            calls[0] += 1
            return masked(*args, **kwargs)

        return helper

    for name in ("_mask_keys", "_mask_keys_t"):  # (the dk/dv kernel's tiles are transposed)
        monkeypatch.setattr(gk, name, counting(getattr(gk, name)))
    results = {}
    for fast in (True, False):
        calls[0] = 0
        with gk.fast_path(fast):
            results[fast] = _run_backend("triton", tensors, mask, causal, grad_out)
        results[fast, "calls"] = calls[0]
    fast_calls, all_calls = results[True, "calls"], results[False, "calls"]
    # (causal: the diagonal blocks stay masked; full attention: only a partial last key block)
    assert (0 < fast_calls if causal or S % 16 else fast_calls == 0) and fast_calls < all_calls
    for name, a, b in zip(NAMES, results[True], results[False]):
        assert torch.equal(a, b), f"{name}: the fast path differs from the masked path"
    _check_against_reference("triton", tensors, mask, causal, torch.float32, grad_out=grad_out)


# (S, P, dtype, Dh, path) for B = 2, H = 4, Hkv = 2, T = 40 (80 packed query rows): the fused
# backward where the keys and the prompt keys fit their blocks (the default row: 64 keys and 32 prompt
# keys at Dh 32-64, 32 and 32 at Dh 80-128), else the rows backward where the 80 rows fit its block (the
# default row, sm_80's: 128 rows at Dh 32, 64 at Dh 64-128, fp32 64 at Dh 32, none at Dh 80-128),
# else the three launches.
SHORT_PATH_CASES = [
    (64, 16, torch.float16, 64, "fused"),
    (1, 1, torch.float16, 64, "fused"),
    (65, 16, torch.float16, 64, "three"),
    (64, 65, torch.float16, 32, "rows"),
    (64, 33, torch.float16, 64, "three"),  # (33 prompt keys: not fused; 80 rows: more than 64 at Dh 64)
    (200, 3, torch.float16, 32, "rows"),
    (32, 5, torch.float16, 80, "fused"),
    (33, 5, torch.float16, 80, "three"),
    (37, 19, torch.float32, 32, "fused"),  # (fp32: the interpreter only; GPUs take the three launches)
    (70, 0, torch.float32, 32, "three"),
]
THREE = ["_gpa_bwd_preprocess_kernel", "_gpa_bwd_dkdv_kernel", "_gpa_bwd_dq_kernel"]


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's launch configuration")
@pytest.mark.parametrize("S,P,dtype,Dh,path", SHORT_PATH_CASES)
@pytest.mark.parametrize("Bp", [2, 1], ids=["prompt-per-batch", "prompt-broadcast"])
def test_short_path_is_taken_where_it_applies(S, P, dtype, Dh, path, Bp, monkeypatch):
    """The backward is the fused launch (one program per (b, kv head), the key and prompt blocks the
    next powers of two of S and P, at least 16) exactly where every key fits one block, else the rows
    launch (one program per (b, kv head), a block of the next power of two of the group's packed
    query rows, prompt blocks of 16) where those rows fit one block, else the three launches; with
    ``short_path(False)`` the rows launch where it applies, with ``rows_path(False)`` too always the
    three. The one-launch paths' only other device ops: zeroing dgate (added atomically) and, for a
    broadcast prompt, the two sums over the batch."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    grids = _record_kernels(gk, monkeypatch)
    B, H, Hkv, T = 2, 4, 2, 40
    q = torch.randn(B, H, T, Dh, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, Dh, dtype=dtype) for _ in range(2))
    pk, pv = (torch.randn(Bp, Hkv, P, Dh, dtype=dtype) for _ in range(2))
    gate, out, lse = torch.rand(H), torch.randn(B, H, T, Dh, dtype=dtype), torch.randn(B, H, T)
    grad_out, rec = torch.ones_like(out), _OpRecorder()
    assert gk._backward_path(gk.DEFAULT_ARCH, dtype, Dh, H // Hkv, T, S, P).startswith(path)
    with rec:
        gk.backward(grad_out, q, k, v, pk, pv, gate, None, out, lse, True, 0.1)
    sums = ["sum", "sum"] if Bp == 1 and P > 0 else []
    if path == "three":
        assert [g[0] for g in grids] == THREE
    else:
        ((name, grid, kwargs),) = grids
        assert name == f"_gpa_bwd_{path}_kernel" and grid == (B * Hkv,)
        if path == "fused":
            assert kwargs["BLOCK_N"] == max(32, 1 << (S - 1).bit_length())  # (the row's fewest: 32)
            assert kwargs["BLOCK_NP"] == max(16, 1 << (max(P, 1) - 1).bit_length())
        else:
            assert kwargs["BLOCK_M"] == 128  # (the next power of two of the 80 rows)
            assert kwargs["BLOCK_NP"] == 16
        assert [op for op in rec.ops if op != "fill_"] == ["zero_", *sums], rec.ops
    grids.clear()
    with gk.short_path(False):
        gk.backward(torch.ones_like(out), q, k, v, pk, pv, gate, None, out, lse, True, 0.1)
    rows_fit = gk.rows_tile(gk.DEFAULT_ARCH, dtype, Dh, H // Hkv * T) is not None
    assert [g[0] for g in grids] == (["_gpa_bwd_rows_kernel"] if rows_fit else THREE)
    grids.clear()
    with gk.short_path(False), gk.rows_path(False):
        gk.backward(torch.ones_like(out), q, k, v, pk, pv, gate, None, out, lse, True, 0.1)
    assert [g[0] for g in grids] == THREE


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
def test_benchmark_three_launch_provider_takes_the_three_launches(monkeypatch):
    """The GPU benchmark's ``prompt_kernels (three launches)`` provider really runs the three-launch
    backward where the default takes a one-launch path (the fused one under the interpreter; on a
    GPU, where fp32 does not fuse, the rows one), with the same values."""
    from benchmarks.bench_gated_prefix_attention import three_launches
    from prompt_kernels.kernels import gated_prefix_attention as gk

    used = []
    real = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda kernel, *a, **k: used.append(kernel) or real(kernel, *a, **k))
    tensors, m = make_inputs(1, 2, 2, 5, 7, 3, 32, 1, "head", "bool", torch.float32)
    grad_out, dev = torch.randn(1, 2, 5, 32), device_for("triton")
    with _use_backend("triton"):
        default = _run(gated_prefix_attention, tensors, m, False, grad_out, dev)
        assert used == ["fwd", "fused" if INTERPRET else "rows"]
        used.clear()
        with three_launches():
            three = _run(gated_prefix_attention, tensors, m, False, grad_out, dev)
    assert used == ["fwd", "pre", "dkdv", "dq"]
    for name, a, b in zip(NAMES, default, three):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_tiles_per_arch():
    """The fused backward's tiles: fp16/bf16 only on sm_80 and sm_90 (fp32 takes the three launches
    there), at least 64 keys on sm_90 (wgmma's 64 rows: the dk/dv products' M dimension), every tile
    the launcher can choose registered as a compile spec (in every variant at Dh 64 for the largest)."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    names = {s.name for s in gk._compile_specs() if s.name.startswith("gpa_bwd_fused[")}
    for arch in gk.ARCHS:
        assert gk.fused_tile(arch, torch.float32, 32, 16, 16) is None
        for dtype in (torch.float16, torch.bfloat16):
            ty = gk._TRITON_TYPE[dtype]
            for Dh in gk.HEAD_DIMS:
                tiles = gk.fused_tiles(arch, dtype, Dh)
                assert tiles and gk.fused_tile(arch, dtype, Dh, 32, 16) in tiles
                for S in range(1, 129, 7):
                    for P in (0, 1, 16, 17, 40, 64, 65):
                        t = gk.fused_tile(arch, dtype, Dh, S, P)
                        assert t is None or (
                            t in tiles and t.kwargs["BLOCK_N"] >= S and t.kwargs["BLOCK_NP"] >= P
                        )
                for t in tiles:
                    assert t.kwargs["BLOCK_N"] >= (64 if arch >= 90 else 16), (arch, Dh, t)
                    kw = t.kwargs
                    name = f"gpa_bwd_fused[{ty},Dh={Dh},mask=add,causal=1,BM={kw['BLOCK_M']},BN={kw['BLOCK_N']},BNP={kw['BLOCK_NP']}]"
                    assert name in names, name
            assert gk.fused_tile(arch, dtype, 64, 64, 16) is not None  # T ~ 64 classifiers, Dh 64


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize(
    "dtype,Dh,S,P",
    [(torch.float32, 32, 50, 37), (torch.float16, 80, 29, 9)],
    ids=["fp32-D32-P37", "fp16-D80"],
)
def test_fused_launcher_blocks(dtype, Dh, S, P):
    """The fused backward with the launcher's own tiles (several query blocks, GQA, causal with T > S,
    a per-head additive mask with -inf), against the reference (on a GPU fp32 takes the three launches,
    checked the same way)."""
    tensors, m = make_inputs(2, 4, 2, 70, S, P, Dh, 1, "head", "add_h", dtype)
    _check_against_reference("triton", tensors, m, True, dtype, small_blocks=False)


def test_rows_tiles_per_arch():
    """The rows backward's tiles: every tile the launcher can choose registered as a compile spec (in
    every variant at Dh 64 for the largest), a block that holds all the group's packed query rows, at
    least 64 keys and 64 rows on sm_90 at fp16/bf16 (wgmma's 64 rows: HGMMA), 128 rows at Dh 32-64 on
    sm_90 (a group of 2 at T = 64, or T = 128), fp32 at Dh 80-128 nowhere (every tile spills)."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    names = {s.name for s in gk._compile_specs() if s.name.startswith("gpa_bwd_rows[")}
    for arch in gk.ARCHS:
        for dtype in gk.DTYPES:
            ty = gk._TRITON_TYPE[dtype]
            for Dh in gk.HEAD_DIMS:
                tiles = gk.rows_tiles(arch, dtype, Dh)
                if dtype == torch.float32 and Dh > 64:
                    assert not tiles and gk.rows_tile(arch, dtype, Dh, 1) is None
                    continue
                assert tiles, (arch, dtype, Dh)
                for rows in (1, 2, 31, 32, 33, 64, 65, 100, 128, 129, 1000):
                    t = gk.rows_tile(arch, dtype, Dh, rows)
                    assert t is None or (t in tiles and t.kwargs["BLOCK_M"] >= rows), (arch, Dh, rows)
                for t in tiles:
                    kw = t.kwargs
                    if arch >= 90 and dtype != torch.float32:  # (dk/dv tiles of 64 keys: HGMMA)
                        assert kw["BLOCK_N"] >= 64 and kw["BLOCK_M"] >= 64, (arch, Dh, t)
                    name = f"gpa_bwd_rows[{ty},Dh={Dh},mask=add,causal=1,BM={kw['BLOCK_M']},BN={kw['BLOCK_N']},BNP={kw['BLOCK_NP']}]"
                    assert name in names, name
        for dtype in (torch.float16, torch.bfloat16):
            if arch >= 90:
                assert gk.rows_tile(arch, dtype, 64, 128) is not None
            assert gk.rows_tile(arch, dtype, 32, 128) is not None


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize(
    "dtype,Dh,B,H,Hkv,T,S,P,mask",
    [
        (torch.float32, 32, 2, 4, 2, 30, 70, 19, "add_h"),
        (torch.float32, 64, 1, 3, 1, 9, 100, 0, "add_hf"),
        (torch.float16, 80, 2, 2, 2, 50, 40, 9, "bool_empty"),
    ],
    ids=["fp32-D32-group2", "fp32-D64-group3-P0-hf", "fp16-D80"],
)
def test_rows_launcher_blocks(dtype, Dh, B, H, Hkv, T, S, P, mask):
    """The rows backward with the launcher's own tiles (the group's packed rows in one block, several
    key blocks and prompt blocks, causal with T < S, per-head masks, Hugging Face's finfo.min rows,
    a fully padded row), against the reference; the tile is the launcher's (where the rows fit)."""
    from prompt_kernels.kernels import gated_prefix_attention as gk

    assert gk.rows_tile(gk.DEFAULT_ARCH, dtype, Dh, H // Hkv * T) is not None
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 1, "mixed", mask, dtype)
    _check_against_reference(ROWS, tensors, m, True, dtype, small_blocks=False)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs the Triton interpreter or a GPU")
def test_rows_backward_through_an_attached_model(monkeypatch):
    """As a user meets it: prefix tuning attached to an fp16 BERT, 100 tokens with padding (more keys
    than the fused backward takes, 100 rows within the rows block), loss and backward on the Triton
    backend. The rows backward runs, and the prompt gradients' error against the same model in float32
    is at most twice that of the PyTorch backend in fp16."""
    import transformers

    import prompt_kernels as pk
    from prompt_kernels.kernels import gated_prefix_attention as gk

    used, real = [], gk._launch
    monkeypatch.setattr(gk, "_launch", lambda kernel, *a, **k: used.append(kernel) or real(kernel, *a, **k))
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    dev = device_for("triton")
    ids = torch.randint(0, 100, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 80:] = 0

    def prompt_grads(dtype, backend):
        torch.manual_seed(1)
        pm = pk.attach(model.to(dev, dtype), pk.PrefixTuningConfig(prompt_length=5, prefix_dropout=0.0))
        with _use_backend(backend):
            pm(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=torch.tensor([0, 1], device=dev)
            ).loss.backward()
        grads = [p.grad.float().cpu() for p in pm.prompt_parameters()]
        pm.detach()
        return grads

    ref = prompt_grads(torch.float32, "torch")
    torch16 = prompt_grads(torch.float16, "torch")
    used.clear()
    triton16 = prompt_grads(torch.float16, "triton")
    assert "rows" in used and "dq" not in used, used
    with gk.rows_path(False):
        three16 = prompt_grads(torch.float16, "triton")
    for r, a, b, c in zip(ref, torch16, triton16, three16, strict=True):
        assert torch.isfinite(b).all() and b.abs().max() > 0
        assert (b - r).abs().max() <= 2 * (a - r).abs().max() + 1e-6
        # The model's fp16 layers dominate that error (every backend's is the same to 4 digits), so
        # the rows backward is also held to the three launches' answer in the same fp16 model.
        assert (b - c).abs().max() <= 1e-3 * c.abs().max()


# (B, H, Hkv, T, S, P, Dh, prompt batch, gate kind, mask kind, causal): GQA groups of 3 and 4 through the
# forward's packed rows (query t of the group's head hh at row t * group + hh): blocks that end inside a
# query's group of rows, gates that differ (and are 0) within one group, per-head masks, T = 1.
GQA_CASES = [
    (1, 3, 1, 7, 20, 5, 32, 1, "mixed", "add_h", True),  # group 3, gate 0 on 2 of the group's 3 heads
    (2, 6, 2, 1, 9, 3, 32, 2, "bh", "bool", False),  # T = 1, group 3, per-batch prompt
    (2, 6, 2, 11, 6, 4, 32, 1, "head", "none", True),  # causal T > S (fast path), group 3
    (1, 4, 1, 5, 8, 0, 32, 1, "ones", "add_hf", False),  # group 4, P = 0, finfo.min fully masked rows
    (2, 6, 3, 9, 13, 2, 80, 1, "zero", "add_1", True),  # group 2, Dh 80 (fp32 chunked q.k), gate 0
]


@pytest.mark.parametrize("small_blocks", [True, False], ids=["blocks16", "launcher-blocks"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("triton", ROWS, LONG)])
@pytest.mark.parametrize("case", GQA_CASES, ids=[f"B{c[0]}H{c[1]}kv{c[2]}T{c[3]}-{c[9]}" for c in GQA_CASES])
def test_gqa_packed_forward_rows(case, backend, small_blocks):
    """The forward packs the query rows of a GQA group into one tile per (b, kv head): value and every
    gradient against the float64 reference, with 16-row blocks (several per group) and the launcher's."""
    B, H, Hkv, T, S, P, Dh, Bp, gate, mask, causal = case
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, Bp, gate, mask, torch.float32)
    _check_against_reference(backend, tensors, m, causal, torch.float32, small_blocks=small_blocks)


@pytest.mark.skipif(not INTERPRET, reason="the traffic meter runs under the Triton interpreter")
@pytest.mark.parametrize("group", [1, 2, 3, 4])
@pytest.mark.parametrize("mask_kind,causal", [("none", False), ("bool", True)], ids=["full", "bool-causal"])
def test_forward_reads_kv_once_per_group_block(group, mask_kind, causal):
    """The forward's traffic (interpreter's meter, 16-row blocks): q read once, out and lse written
    once, and the keys, values and prompt of a kv head issued once per block of the group's packed
    query rows, cdiv(group * T, BLOCK_M) times, not once per query head and query block (which was
    group * cdiv(T, BLOCK_M) times: 1.44x-1.57x the byte floor at the launch cases)."""
    from prompt_kernels.kernels import gated_prefix_attention as gk
    from prompt_kernels.tools.traffic import TrafficMeter

    B, Hkv, T, S, P, Dh, BM = 2, 2, 20, 40, 7, 32, 16
    H = Hkv * group
    tensors, m = make_inputs(B, H, Hkv, T, S, P, Dh, 1, "bh", mask_kind, torch.float32)
    q, k, v, pk, pv, gate = tensors
    with gk.force_blocks(BM, 16), TrafficMeter() as meter:
        out, lse = gk.forward(q, k, v, pk, pv, gate, m, causal, Dh**-0.5)
    (rec,) = meter.launches
    blocks = -(-group * T // BM)
    assert rec.kernel == "_gpa_fwd_kernel" and rec.programs == blocks * B * Hkv
    e = 4
    if causal:  # the 16-key blocks below each block's last query (query t sees keys <= t + S - T)
        last = [min((i * BM + BM - 1) // group, T - 1) for i in range(blocks)]
        kv_rows = sum(min(-(-max(t + 1 + S - T, 0) // 16) * 16, S) for t in last)
    else:
        kv_rows = blocks * S
    kv = B * Hkv * kv_rows * Dh * e * 2
    prompt = blocks * B * Hkv * P * Dh * e * 2  # (the broadcast prompt: once per program)
    mask_bytes = B * Hkv * kv_rows if mask_kind == "bool" else 0  # (uint8 [B, S], per key block)
    # each row's gate, and the group's in every program (to skip the prompt where they are all 0)
    gates = B * H * T * 4 + rec.programs * group * 4
    assert rec.loaded_bytes == q.numel() * e + kv + prompt + gates + mask_bytes, rec
    assert rec.stored_bytes == rec.unique_stored_bytes == (out.numel() + lse.numel()) * e
    if group > 1:  # K/V issued fewer times than once per query head
        assert blocks < group * -(-T // BM)
    _check_against_reference("triton", tensors, m, causal, torch.float32)


def test_floors():
    for T, S in ((5, 9), (9, 5), (7, 7), (1, 4)):
        brute = sum(1 for t in range(T) for s in range(S) if s <= t + S - T)
        assert _visible_key_pairs(T, S, True) == brute
    f = gated_prefix_attention_floors(2, 4, 2, 8, 16, 3, 64, dtype=torch.float16, gate_numel=4)
    assert f["forward"]["flops"] == 4 * 2 * 4 * 8 * (16 + 3) * 64
    assert f["backward"]["flops"] == f["forward"]["flops"] * 5 // 2
    es = 2
    expect = (2 * 4 * 8 * 64 * es) * 2 + 2 * 2 * 2 * 16 * 64 * es + 2 * 2 * 3 * 64 * es + 16 + 2 * 4 * 8 * 4
    assert f["forward"]["bytes"] == expect


def _opcheck_args(mask_kind):
    tensors, m = make_inputs(2, 4, 2, 5, 7, 3, 32, 1, "head", mask_kind, torch.float32)
    tensors = [t.requires_grad_() for t in tensors]
    return (*tensors, m, True, 32**-0.5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "add_1"])
def test_opcheck(mask_kind):
    args = _opcheck_args(mask_kind)
    with use_backend("torch"):
        torch.library.opcheck(_gpa_op, args)
        out, *saved = _gpa_op(*args)
        grad_out = torch.randn(out.shape)
        bargs = (
            grad_out,
            *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:7]],
            out.detach(),
            *saved,
        )
        torch.library.opcheck(_gpa_backward_op, (*bargs, True, 32**-0.5))


@pytest.mark.skipif(
    not INTERPRET, reason="opcheck of the interpreted kernels (on a GPU the CUDA tests cover them)"
)
def test_opcheck_triton():
    args = _opcheck_args("bool")
    with use_backend("triton"), _blocks("triton"):
        torch.library.opcheck(
            _gpa_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
        )


def test_torch_compile_fullgraph():
    tensors, m = make_inputs(2, 4, 2, 6, 8, 3, 32, 1, "head", "add_1", torch.float32)

    def f(q, k, v, pk, pv, g, mask):
        return gated_prefix_attention(q, k, v, pk, pv, g, mask, is_causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with use_backend("torch"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        loss = compiled(*leaves, m)
        grads = torch.autograd.grad(loss, leaves)
        leaves2 = [t.clone().requires_grad_() for t in tensors]
        loss2 = f(*leaves2, m)
        grads2 = torch.autograd.grad(loss2, leaves2)
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor():
    tensors, m = make_inputs(1, 2, 2, 4, 5, 2, 32, 1, "scalar", "bool", torch.float32)
    f = lambda *a: gated_prefix_attention(*a, m)
    with use_backend("torch"):
        out = torch.compile(f, fullgraph=True)(*tensors)
        torch.testing.assert_close(out, f(*tensors))


def _good(**over):
    B, H, Hkv, T, S, P, Dh = 2, 4, 2, 3, 5, 2, 8
    d = dict(
        query=torch.randn(B, H, T, Dh),
        key=torch.randn(B, Hkv, S, Dh),
        value=torch.randn(B, Hkv, S, Dh),
        prompt_key=torch.randn(1, Hkv, P, Dh),
        prompt_value=torch.randn(1, Hkv, P, Dh),
        gate=torch.full((H,), 0.5),
        attention_mask=None,
    )
    d.update(over)
    return d


BAD = [
    ("heads", dict(key=torch.randn(2, 3, 5, 8), value=torch.randn(2, 3, 5, 8)), ValueError, "multiple"),
    ("head size", dict(key=torch.randn(2, 2, 5, 4), value=torch.randn(2, 2, 5, 4)), ValueError, "key"),
    ("value shape", dict(value=torch.randn(2, 2, 6, 8)), ValueError, "value"),
    (
        "prompt heads",
        dict(prompt_key=torch.randn(1, 4, 2, 8), prompt_value=torch.randn(1, 4, 2, 8)),
        ValueError,
        "prompt_key",
    ),
    (
        "prompt batch",
        dict(prompt_key=torch.randn(3, 2, 2, 8), prompt_value=torch.randn(3, 2, 2, 8)),
        ValueError,
        "prompt_key",
    ),
    ("prompt value", dict(prompt_value=torch.randn(1, 2, 3, 8)), ValueError, "prompt_value"),
    ("query ndim", dict(query=torch.randn(2, 4, 3)), ValueError, "query"),
    ("dtype", dict(key=torch.randn(2, 2, 5, 8, dtype=torch.float16)), TypeError, "key"),
    ("float64", dict(query=torch.randn(2, 4, 3, 8, dtype=torch.float64)), TypeError, "query"),
    ("int query", dict(query=torch.ones(2, 4, 3, 8, dtype=torch.int32)), TypeError, "query"),
    ("device", dict(prompt_key=torch.randn(1, 2, 2, 8, device="meta")), ValueError, "prompt_key"),
    ("gate device", dict(gate=torch.full((4,), 0.5, device="meta")), ValueError, "gate"),
    ("gate > 1", dict(gate=torch.full((4,), 1.5)), ValueError, "gate"),
    ("gate < 0", dict(gate=torch.tensor(-0.1)), ValueError, "gate"),
    ("gate shape", dict(gate=torch.full((5,), 0.5)), ValueError, "gate"),
    ("gate 3d", dict(gate=torch.full((1, 2, 4), 0.5)), ValueError, "gate"),
    ("gate int", dict(gate=torch.ones(4, dtype=torch.int64)), TypeError, "gate"),
    ("gate float", dict(gate=0.5), TypeError, "gate"),
    (
        "bool mask shape",
        dict(attention_mask=torch.ones(2, 6, dtype=torch.bool)),
        ValueError,
        "attention_mask",
    ),
    ("additive heads", dict(attention_mask=torch.zeros(2, 2, 3, 5)), ValueError, "attention_mask"),
    ("additive 3d", dict(attention_mask=torch.zeros(2, 3, 5)), ValueError, "attention_mask"),
    ("additive T", dict(attention_mask=torch.zeros(2, 1, 4, 5)), ValueError, "attention_mask"),
    ("int mask", dict(attention_mask=torch.ones(2, 5, dtype=torch.int64)), TypeError, "attention_mask"),
    ("mask list", dict(attention_mask=[[1]]), TypeError, "attention_mask"),
]


@pytest.mark.parametrize("name,over,exc,word", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, over, exc, word):
    with pytest.raises(exc, match=word):
        gated_prefix_attention(**_good(**over))


def test_bad_scalars():
    with pytest.raises(TypeError, match="scale"):
        gated_prefix_attention(**_good(), scale="big")
    with pytest.raises(TypeError, match="is_causal"):
        gated_prefix_attention(**_good(), is_causal=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_training_skips_the_custom_op_with_identical_results(backend, monkeypatch):
    """Eager training runs the custom ops' implementations through an autograd.Function (no
    dispatch cost): values and all six gradients bit-identical to the custom op's."""
    tensors, m = make_inputs(2, 4, 2, 6, 7, 3, 32, 1, "head", "bool", torch.float32)
    dev = device_for(backend)
    tensors, m = [t.to(dev) for t in tensors], m.to(dev)
    grad_out = torch.randn(tensors[0].shape, device=dev)
    op_module = importlib.import_module("prompt_kernels.ops.gated_prefix_attention")
    via_op = lambda *a: _gpa_op(*a, m, True, 32**-0.5, True)[0]
    results = []
    with use_backend(backend), _blocks(backend):
        for fn in (via_op, lambda *a: gated_prefix_attention(*a, m, True)):
            leaves = [t.detach().requires_grad_() for t in tensors]
            out = fn(*leaves)
            results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
        monkeypatch.setattr(op_module, "_gpa_op", None)  # the eager path must not touch the ops
        monkeypatch.setattr(op_module, "_gpa_backward_op", None)
        leaves = [t.detach().requires_grad_() for t in tensors]
        torch.autograd.grad(gated_prefix_attention(*leaves, m, True), leaves, grad_out)
    for ours, op in zip(*results):
        torch.testing.assert_close(ours, op, rtol=0, atol=0)
