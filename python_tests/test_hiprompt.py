"""HiPrompt (prompt_kernels.methods.hiprompt): config, parameter counts, interaction terms against brute
force over pairs and triples, equality with plain deep prompts at initialisation, gradients, save/load,
encoder (tiny BERT) and causal LM (tiny Llama)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from patch_helpers import D, DeepPromptTestConfig, assert_save_load_round_trip, batch, tiny_model

import prompt_kernels as pk
from prompt_kernels.configs import config_from_dict, config_from_json
from prompt_kernels.methods.hiprompt import HiPrompt, HiPromptConfig, interaction_terms

MODELS = ("bert", "llama")


def _attach(model_type, head="cls", layers=3, **cfg):
    model = tiny_model(model_type, head=head, dropout=False, num_hidden_layers=layers)
    return pk.attach(model, HiPromptConfig(**{"prompt_length": 3, "rank": 6, **cfg}))


def _brute_force(E):
    """I2_l = sum_{m != l} E_l E_m, I3_l = sum_{m < n, m, n != l} E_l E_m E_n, by loops."""
    L = E.shape[0]
    I2, I3 = torch.zeros_like(E), torch.zeros_like(E)
    for layer in range(L):
        others = [m for m in range(L) if m != layer]
        for m in others:
            I2[layer] += E[layer] * E[m]
        for m, n in itertools.combinations(others, 2):
            I3[layer] += E[layer] * E[m] * E[n]
    return I2, I3


def _randomise_interactions(m):
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if not name.startswith(("prompts", "prompt_")):
                prm.normal_(0.0, 0.3)


def test_config_defaults_round_trip_and_rejects():
    cfg = HiPromptConfig(prompt_length=4)
    assert (cfg.rank, cfg.max_order, cfg.base_rank) == (64, 3, None)
    for c in (cfg, HiPromptConfig(prompt_length=2, rank=8, max_order=1, base_rank=5)):
        assert HiPromptConfig.from_json(c.to_json()) == c
        assert config_from_json(c.to_json()) == c
        assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert pk.HiPromptConfig is HiPromptConfig
    for bad in ({"prompt_length": 0}, {"rank": 0}, {"max_order": 0}, {"max_order": 4}, {"base_rank": 0}):
        with pytest.raises(ValueError):
            HiPromptConfig(**bad)


@pytest.mark.parametrize("L", [1, 2, 5])
def test_interaction_terms_match_brute_force(L):
    E = torch.randn(L, 3, 4, dtype=torch.float64)
    I2, I3 = interaction_terms(E, 3)
    B2, B3 = _brute_force(E)
    torch.testing.assert_close(I2, B2)
    torch.testing.assert_close(I3, B3)
    assert interaction_terms(E, 1) == (None, None)
    I2only, none = interaction_terms(E, 2)
    assert none is None
    torch.testing.assert_close(I2only, B2)


@pytest.mark.parametrize(
    "order,base_rank,model_type",
    [(3, None, "bert"), (2, None, "llama"), (1, None, "bert"), (3, 4, "llama")],
)
def test_parameter_count_and_shapes(order, base_rank, model_type):
    pm = _attach(model_type, max_order=order, base_rank=base_rank)
    L, p, d, r = 3, 3, D, 6
    expected = L * p * d if base_rank is None else L * p * base_rank + base_rank * d
    if order >= 2:
        expected += d * r + 2 * r + r * d
    if order == 3:
        expected += 2 * r + r * d
    assert pm.num_trainable_parameters == expected
    assert sum(q.numel() for q in pm.prompt_parameters()) == expected
    m = pm.method
    assert isinstance(m, HiPrompt) and m.all_prompts().shape == (L, p, d)
    ids, mask = batch(model_type)
    assert pm(input_ids=ids, attention_mask=mask).logits.shape == (3, 3)


@pytest.mark.parametrize("model_type", MODELS)
def test_refined_prompts_by_brute_force(model_type):
    """P_l = Z_l + W_2 LN(I2_l) + W_3 LN(I3_l) with the interactions summed over pairs and triples by loops,
    and the prefix of layer l is P_l through layer l's frozen key/value projections."""
    pm = _attach(model_type, head="base", base_rank=4)
    m = pm.method
    _randomise_interactions(m)
    with torch.no_grad():
        Z = (m.prompt_factors @ m.prompt_basis).double()
        E = Z @ m.embed.weight.double().T
        B2, B3 = _brute_force(E)
        ln2 = F.layer_norm(B2, (6,), m.order2_norm.weight.double(), m.order2_norm.bias.double())
        ln3 = F.layer_norm(B3, (6,), m.order3_norm.weight.double(), m.order3_norm.bias.double())
        want = Z + ln2 @ m.order2_out.weight.double().T + ln3 @ m.order3_out.weight.double().T
        torch.testing.assert_close(m.all_prompts().double(), want, rtol=1e-5, atol=1e-5)
    prefixes, original = {}, m.prefix

    def spy(ctx, idx):
        out = original(ctx, idx)
        prefixes[idx] = out
        return out

    m.prefix = spy
    ids, mask = batch(model_type)
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=mask)
        assert sorted(prefixes) == [0, 1, 2]
        for idx, (key, value, gate) in prefixes.items():
            assert gate is None
            attn = pm.info.attentions[idx]
            kp, vp = (attn.key, attn.value) if model_type == "bert" else (attn.k_proj, attn.v_proj)
            P = want[idx].float()[None]
            Hkv, Dh = pm.info.num_kv_heads, pm.info.head_dim
            torch.testing.assert_close(key, kp(P).view(1, 3, Hkv, Dh).transpose(1, 2), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(value, vp(P).view(1, 3, Hkv, Dh).transpose(1, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("model_type", MODELS)
def test_initialisation_equals_plain_deep_prompts(model_type, order):
    """W_2 = W_3 = 0 at init: the same outputs as deep prompts Z_l through the frozen K/V with gate 1."""
    pm = _attach(model_type, head="base", max_order=order)
    m = pm.method
    if order == 3:  # LN / W_e are not at their init values; only W_2 = W_3 = 0 matters
        with torch.no_grad():
            m.embed.weight.normal_()
            m.order2_norm.bias.normal_()
    ids, mask = batch(model_type)
    with torch.no_grad():
        torch.testing.assert_close(m.all_prompts(), m.prompts, rtol=0, atol=0)
        got = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    plain = pk.attach(
        tiny_model(model_type, head="base", dropout=False, num_hidden_layers=3),
        DeepPromptTestConfig(prompt_length=3, gate=1.0),
    )
    with torch.no_grad():
        plain.method.prompts.copy_(m.prompts)
        want = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unprompted = pm.detach()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(got, unprompted, atol=1e-4)


@pytest.mark.parametrize("model_type", MODELS)
def test_only_method_gets_gradients(model_type):
    pm = _attach(model_type, head="cls")
    _randomise_interactions(pm.method)  # at init W_2 = W_3 = 0 blocks the gradient to W_e and the LNs
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
    pm = _attach(model_type, head="cls", base_rank=4).eval()
    _randomise_interactions(pm.method)
    assert_save_load_round_trip(pm, model_type, tmp_path, HiPrompt, num_hidden_layers=3)


def test_causal_lm_loss_and_generate():
    pm = _attach("llama", head="lm")
    ids, _ = batch("llama", pad_last=0)
    pm.train()
    out = pm(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 7, 99) and torch.isfinite(out.loss)
    out.loss.backward()
    assert pm.method.prompts.grad.abs().sum() > 0
    pm.eval()
    gen = pm.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 10)


@pytest.mark.parametrize("base_rank", [None, 4])
@pytest.mark.parametrize("model_type", MODELS)
def test_layer_norms_normalise_at_init(model_type, base_rank):
    """At initialisation E = Z W_e has about unit variance and the interaction terms' variances are far
    above the LayerNorm eps, so LN_2 and LN_3 normalise (LN(2 I) = LN(I)) instead of acting as a fixed
    scaling x / sqrt(eps) (I3 had a variance ~1e-8 with the default Linear init)."""
    pm = _attach(model_type, head="base", layers=4, base_rank=base_rank, rank=16)
    m = pm.method
    with torch.no_grad():
        E = m.embed(m.base_prompts())
        assert 0.1 < E.var().item() < 10.0  # about 1 (few entries on the tiny model)
        I2, I3 = interaction_terms(E, 3)
        for term, norm in ((I2, m.order2_norm), (I3, m.order3_norm)):
            assert term.var(-1).min().item() > 100 * norm.eps
            torch.testing.assert_close(norm(2 * term), norm(term), rtol=1e-2, atol=1e-2)
