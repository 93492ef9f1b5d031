"""GPC (prompt_kernels.methods.gpc): config, parameter counts, the cell by hand, the keep-everything cell,
gradients, save/load, encoder (tiny BERT) and causal LM (tiny Llama)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from patch_helpers import D, assert_save_load_round_trip, batch, tiny_model

import prompt_kernels as pk
from prompt_kernels.configs import config_from_dict, config_from_json
from prompt_kernels.methods.gpc import GPC, GPCConfig, rms, token_scale

MODELS = ("bert", "llama")


def _attach(model_type, head="cls", layers=3, **cfg):
    model = tiny_model(model_type, head=head, dropout=False, num_hidden_layers=layers)
    return pk.attach(model, GPCConfig(**{"prompt_length": 3, **cfg}))


def _layer_inputs(pm, ids, mask):
    """The hidden states entering every layer ``[B, p + T, d]`` (forward pre-hooks after the patch layer's)."""
    seen = {}

    def hook(idx):
        def fn(layer, args, kwargs):
            seen[idx] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return fn

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(pm.info.layers)
    ]
    try:
        with torch.no_grad():
            out = pm(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def test_config_defaults_round_trip_and_rejects():
    cfg = GPCConfig(prompt_length=4)
    assert (cfg.rank, cfg.forget_bias) == (64, 1.0)
    for c in (cfg, GPCConfig(prompt_length=2, rank=None, forget_bias=-0.5)):
        assert GPCConfig.from_json(c.to_json()) == c
        assert config_from_json(c.to_json()) == c
        assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert pk.GPCConfig is GPCConfig
    for bad in ({"prompt_length": 0}, {"rank": 0}, {"rank": -3}):
        with pytest.raises(ValueError):
            GPCConfig(**bad)
    with pytest.raises(TypeError):
        GPCConfig(rank=2.5)


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("model_type", MODELS)
def test_parameter_count_and_shapes(model_type, rank):
    pm = _attach(model_type, rank=rank)
    p, d = 3, D
    if rank is None:
        expected = p * d + 3 * (2 * d * d + d) + (d * d + d)
    else:
        r = rank
        expected = p * d + 3 * (2 * d * r + r * d + d) + (d * r + r * d + d)
    assert pm.num_trainable_parameters == expected
    assert sum(q.numel() for q in pm.prompt_parameters()) == expected
    m = pm.method
    assert isinstance(m, GPC) and m.prompt.shape == (p, d) and m.sequence_layer == 0
    ids, mask = batch(model_type)
    out = pm(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (3, 3)  # rows removed before the head
    torch.testing.assert_close(m.forget_gate[-1].bias if rank else m.forget_gate.bias, torch.ones(d))


def _rms(x):
    return x.square().mean(-1, keepdim=True).sqrt()


@pytest.mark.parametrize("model_type", MODELS)
def test_cell_by_hand(model_type):
    """The rows entering layer l + 1 are s * y / RMS(y), y = o * tanh(f * c + i * tanh(W_c h^ + b_c)), with
    h the rows layer l output, s their RMS and h^ = h / s; the rows entering layer 0 are s_0 P^."""
    pm = _attach(model_type, head="base", rank=None)
    m = pm.method
    with torch.no_grad():
        for gate in (m.forget_gate, m.input_gate, m.output_gate, m.candidate):
            gate.bias.normal_()
    calls = []
    original = m.sequence_update

    def spy(ctx, idx, rows):
        new = original(ctx, idx, rows)
        calls.append((idx, rows.detach().clone(), new.detach().clone()))
        return new

    m.sequence_update = spy
    ids, mask = batch(model_type)
    seen, _ = _layer_inputs(pm, ids, mask)
    assert [c[0] for c in calls] == [0, 1, 2]
    p = 3
    x0 = seen[0][:, p:].double()
    real = mask.bool()
    s0 = torch.stack([_rms(x0[b, real[b]]).mean() for b in range(3)])[:, None, None]
    torch.testing.assert_close(seen[0][:, :p].double(), s0 * m.prompt.detach().double()[None])
    c = m.prompt[None].detach().double()
    lin = {n: (g.weight.detach().double(), g.bias.detach().double()) for n, g in m.named_children()}
    for _, h, got in calls[:2]:
        s = _rms(h.double())
        h = h.double() / s
        hc = torch.cat([h, c.expand_as(h)], -1)
        f = torch.sigmoid(F.linear(hc, *lin["forget_gate"]))
        i = torch.sigmoid(F.linear(hc, *lin["input_gate"]))
        o = torch.sigmoid(F.linear(hc, *lin["output_gate"]))
        c = f * c + i * torch.tanh(F.linear(h, *lin["candidate"]))
        y = o * torch.tanh(c)
        torch.testing.assert_close(got.double(), s * y / (_rms(y) + 1e-6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(calls[2][2], calls[2][1])  # nothing after the last layer


@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("model_type", MODELS)
def test_keep_everything_cell_gives_tanh_c0_at_every_later_layer(model_type, rank):
    """Forget 1, input 0, output 1 (weights 0, biases +-large): the rows entering layers 1.. are
    tanh(P^) (rescaled to the RMS of the rows the previous layer output)."""
    pm = _attach(model_type, head="base", rank=rank)
    m = pm.method
    with torch.no_grad():
        for gate, b in (
            (m.forget_gate, 100.0),
            (m.input_gate, -100.0),
            (m.output_gate, 100.0),
            (m.candidate, 3.0),
        ):
            for prm in gate.parameters():
                prm.zero_()
            (gate[-1] if rank else gate).bias.fill_(b)
        m.prompt.normal_(0.0, 2.0)  # large enough that tanh(c_0) is far from c_0
    outputs = {}
    original = m.sequence_update

    def spy(ctx, idx, rows):
        outputs[idx] = rows.detach().clone()
        return original(ctx, idx, rows)

    m.sequence_update = spy
    ids, mask = batch(model_type)
    seen, out = _layer_inputs(pm, ids, mask)
    p, T = 3, ids.shape[1]
    assert sorted(seen) == [0, 1, 2]
    assert all(x.shape == (3, p + T, D) for x in seen.values())
    s0 = token_scale(seen[0][:, p:], mask.bool())
    torch.testing.assert_close(seen[0][:, :p], s0 * m.prompt.detach()[None])
    t = torch.tanh(m.prompt.detach())[None]
    direction = t / (_rms(t) + 1e-6)
    for idx in (1, 2):
        want = _rms(outputs[idx - 1]) * direction
        torch.testing.assert_close(seen[idx][:, :p], want, rtol=1e-5, atol=1e-6)
        # what the previous layer output was something else: the cell replaced it
        assert not torch.allclose(outputs[idx - 1], want, atol=1e-2)
    # and the real tokens did see the prompt: the output differs from the unprompted model
    ref = pm.detach()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.last_hidden_state.shape == ref.shape
    assert not torch.allclose(out.last_hidden_state, ref)


@pytest.mark.parametrize("model_type", MODELS)
def test_prompt_rows_are_on_the_token_scale_at_init(model_type):
    """At initialisation the prompt rows entering every layer have about the norm of the real tokens
    entering it (within a factor 2). Before: P^0 had the vocabulary rows' scale (0.02 per entry where
    BERT's embedding LayerNorm makes tokens ~1) and the cell output was bounded in (-1, 1)."""
    pm = _attach(model_type, head="base")
    ids, mask = batch(model_type)
    seen, _ = _layer_inputs(pm, ids, mask)
    real, p = mask.bool(), 3
    for idx, x in seen.items():
        rows = x[:, :p].norm(dim=-1).mean().item()
        tokens = x[:, p:].norm(dim=-1)[real].mean().item()
        assert 0.5 < rows / tokens < 2.0, (idx, rows, tokens)
    assert torch.allclose(rms(pm.method.prompt.detach()), torch.ones(p, 1))


@pytest.mark.parametrize("model_type", MODELS)
def test_only_method_gets_gradients(model_type):
    pm = _attach(model_type, head="cls")
    pm.train()
    ids, mask = batch(model_type)
    out = pm(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    out.loss.backward()
    for name, prm in pm.model.named_parameters():
        assert prm.grad is None, name
    for name, prm in pm.method.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


@pytest.mark.parametrize("model_type", MODELS)
def test_save_load_round_trip(model_type, tmp_path):
    pm = _attach(model_type, head="cls", rank=6).eval()
    assert_save_load_round_trip(pm, model_type, tmp_path, GPC, num_hidden_layers=3)


def test_causal_lm_loss():
    pm = _attach("llama", head="lm")
    ids, _ = batch("llama", pad_last=0)
    pm.train()
    out = pm(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 7, 99)  # sequence rows are not part of the output
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert pm.method.prompt.grad.abs().sum() > 0
