"""Every supported architecture on a tiny random config: base model, classification head, causal LM.

For each: gates 0 give exactly the frozen model, gate 1 changes it and trains only the prompts,
input-style prompts match a manual ``inputs_embeds`` computation (mask, positions, token types),
sequence-style rows are stripped before the head, detach restores the model bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from patch_helpers import (
    DECODERS,
    MODEL_TYPES,
    DeepPromptTestConfig,
    SequenceTestConfig,
    batch,
    main_output,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)

import prompt_kernels as pk

CASES = [(mt, head) for mt in MODEL_TYPES for head in ("base", "cls", "lm") if head != "lm" or mt in DECODERS]


@pytest.mark.parametrize("model_type,head", CASES)
@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_gates_zero_equal_frozen_model_and_gate_one_trains_only_prompts(model_type, head, inner):
    model = tiny_model(model_type, head)
    model.set_attn_implementation(inner)
    ids, mask = batch(model_type)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, attention_mask=mask))
    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=3, gate=0.0))
    assert model.config._attn_implementation == "prompt_kernels"
    out = main_output(pm(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    model = pm.detach()
    assert model.config._attn_implementation == inner

    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=3, gate=1.0))
    out = main_output(pm(input_ids=ids, attention_mask=mask))
    assert (out - ref).abs().max() > 1e-3 * ref.abs().max()
    (out.float() * torch.randn_like(out.float())).sum().backward()
    assert pm.method.prompts.grad is not None and pm.method.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert {id(p) for p in pm.prompt_parameters()} == {id(p) for p in pm.method.parameters()}


@pytest.mark.parametrize("model_type,head", CASES)
def test_input_style_matches_manual_inputs_embeds(model_type, head):
    model = tiny_model(model_type, head)
    ids, mask = batch(model_type)
    B, T = ids.shape
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=4))
    p = 4
    kwargs = {}
    if model_type == "bert":
        kwargs["token_type_ids"] = torch.randint(0, 2, ids.shape)
    out = main_output(pm(input_ids=ids, attention_mask=mask, **kwargs))

    with pm.disabled(), torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        prompt = pm.method.prompt[None].expand(B, -1, -1)
        positions = pm.info.positions
        pos = positions.default_ids(ids, T, 0, ids.device).expand(B, -1)
        first = positions.first
        manual_kwargs = dict(
            inputs_embeds=torch.cat([prompt, emb], 1),
            attention_mask=torch.cat([torch.ones(B, p, dtype=mask.dtype), mask], 1),
            position_ids=torch.cat([torch.full((B, p), first), pos], 1),
        )
        if "token_type_ids" in kwargs:
            manual_kwargs["token_type_ids"] = torch.cat(
                [torch.zeros(B, p, dtype=torch.long), kwargs["token_type_ids"]], 1
            )
        if head == "cls" and model_type in DECODERS:
            # The decoder classifier reads the last real token (found from input_ids, the prompt's
            # placeholders being pad ids); with inputs_embeds it would read the last position.
            hidden = model.base_model(**manual_kwargs).last_hidden_state
            last = mask.sum(1) - 1 + p
            torch.testing.assert_close(
                out.detach(), model.score(hidden)[torch.arange(B), last], rtol=1e-5, atol=1e-6
            )
            return
        ref = main_output(model(**manual_kwargs))
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
    expected_len = T + p if head != "cls" else None
    if expected_len:
        assert out.shape[1] == expected_len


@pytest.mark.parametrize("model_type", [m for m in MODEL_TYPES if m in DECODERS])
def test_input_style_causal_lm_labels_get_minus_100(model_type):
    model = tiny_model(model_type, "lm")
    ids, mask = batch(model_type, pad_last=0)
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    out = pm(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape[1] == 3 + ids.shape[1]
    # Labels [-100 x 3, ids]: the last prompt position predicts the first token (as in PEFT).
    logits = out.logits[:, 2:-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("model_type,head", [c for c in CASES if c[1] != "lm"])
def test_sequence_style_rows_stripped_before_head(model_type, head):
    model = tiny_model(model_type, head)
    ids, mask = batch(model_type)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, attention_mask=mask))
    pm = pk.attach(model, SequenceTestConfig(prompt_length=3, layer=0))
    out = main_output(pm(input_ids=ids, attention_mask=mask))
    assert out.shape == ref.shape
    assert pm.method.updates == [0, 1]
    (out.float() * torch.randn_like(out.float())).sum().backward()
    assert pm.method.rows.grad.abs().sum() > 0 and pm.method.delta.grad is not None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model_type,head", CASES)
def test_detach_restores_bit_for_bit(model_type, head):
    model = tiny_model(model_type, head)
    model.get_input_embeddings().weight.requires_grad_(False)  # a flag that must survive
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = batch(model_type)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, attention_mask=mask))
    hooks = _hook_counts(model)
    for cfg in (
        pk.PrefixTuningConfig(prompt_length=2),
        pk.PromptTuningConfig(prompt_length=2),
        SequenceTestConfig(prompt_length=2, layer=0),
    ):
        pm = pk.attach(model, cfg)
        pm.train()
        out = main_output(pm(input_ids=ids, attention_mask=mask)).float()
        loss = (out * torch.randn_like(out)).sum()
        loss.backward()
        torch.optim.SGD(pm.prompt_parameters(), lr=0.1).step()
        pm.eval()
        assert pm.detach() is model
    assert model.config._attn_implementation == "sdpa"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hook_counts(model) == hooks
    assert not any(hasattr(m, "_prompt_kernels_binding") for m in model.modules())
    assert "forward" not in vars(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids, attention_mask=mask)), ref)


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
