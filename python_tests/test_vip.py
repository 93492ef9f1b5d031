"""VIP (prompt_kernels.methods.vip): config, parameter count, forward on an encoder and a causal LM,
straight-through gradients, EMA codebook, commitment loss, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from patch_helpers import D, assert_save_load_round_trip, batch, tiny_model

import prompt_kernels as pk
from prompt_kernels.configs import config_from_dict, config_from_json
from prompt_kernels.methods.vip import VIP, VIPConfig, embedding_norm
from prompt_kernels.nn.vector_quantizer import VectorQuantizer

MODELS = ("bert", "llama")


def _attach(model_type, head="cls", dropout=False, **cfg):
    model = tiny_model(model_type, head=head, dropout=dropout)
    return pk.attach(model, VIPConfig(**{"prompt_length": 3, **cfg}))


# -- config --------------------------------------------------------------------------------------------
def test_config_defaults_and_round_trip():
    cfg = VIPConfig(prompt_length=4)
    assert (
        cfg.contextualizer_dim,
        cfg.contextualizer_layers,
        cfg.contextualizer_heads,
        cfg.contextualizer_ff,
    ) == (
        32,
        2,
        4,
        64,
    )
    assert cfg.codebook_size == 40 and cfg.codebook_norm == "embedding" and cfg.temperature == 100.0
    assert cfg.temperature_reference_norm == 100.0
    assert (cfg.sample_in_eval, cfg.eval_seed) == (True, 0)  # eval runs the training path, seeded
    assert (cfg.num_samples, cfg.commitment_weight, cfg.ema_decay, cfg.ema_eps, cfg.mode) == (
        10,
        0.1,
        0.99,
        0.01,
        "sample",
    )
    assert VIPConfig(prompt_length=2, codebook_size=7).codebook_size == 7
    odd = VIPConfig(prompt_length=5, codebook_norm=None, mode="nearest", temperature=3.0)
    assert VIPConfig.from_json(odd.to_json()) == odd
    paper = VIPConfig(prompt_length=5, codebook_norm=100, temperature_reference_norm=None, eval_seed=3)
    assert paper.codebook_norm == 100.0 and VIPConfig.from_json(paper.to_json()) == paper
    assert config_from_json(odd.to_json()) == odd
    assert config_from_dict(json.loads(json.dumps(odd.to_dict()))) == odd
    assert pk.VIPConfig is VIPConfig


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_length": 0},
        {"contextualizer_dim": 30},  # not divisible by 4 heads
        {"contextualizer_layers": 0},
        {"codebook_size": 0},
        {"codebook_norm": 0.0},
        {"codebook_norm": "vocab"},
        {"temperature_reference_norm": 0.0},
        {"eval_seed": -1},
        {"temperature": 0.0},
        {"num_samples": 0},
        {"commitment_weight": -0.1},
        {"ema_decay": 1.0},
        {"ema_decay": -0.5},
        {"ema_eps": 0.0},
        {"ema": "kmeans"},
        {"dead_code_threshold": -1.0},
        {"mode": "argmax"},
        {"contextualizer_dropout": 1.0},
    ],
)
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        VIPConfig(**bad)


# -- structure -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_parameter_count_and_shapes(model_type):
    pm = _attach(model_type, prompt_length=3)
    p, d, h, f, n = 3, D, 32, 64, 2
    expected = p * d + (d * h + h) + n * (4 * h * h + 4 * h + 2 * h * f + h + f + 4 * h) + (h * d + d)
    assert pm.num_trainable_parameters == expected
    assert sum(q.numel() for q in pm.prompt_parameters()) == expected
    m = pm.method
    assert isinstance(m, VIP) and m.prompt.shape == (p, d)
    assert m.quantizer.codebook.shape == (30, d)
    assert not m.quantizer.codebook.requires_grad
    norms = m.quantizer.codebook.norm(dim=-1)
    table_norms = pm.info.input_embeddings.weight.detach().double().norm(dim=-1)
    assert m.codebook_norm == pytest.approx(table_norms[table_norms > 0].mean().item(), rel=1e-9)
    assert m.codebook_norm == embedding_norm(pm.info)
    torch.testing.assert_close(norms, torch.full_like(norms, m.codebook_norm))
    # τ is the paper's at norm 100, rescaled with the squared norm
    assert m.temperature == pytest.approx(100.0 * (m.codebook_norm / 100.0) ** 2)
    assert m.quantizer.temperature == m.temperature
    # the prompt starts as vocabulary rows
    table = pm.info.input_embeddings.weight
    for row in m.prompt:
        assert torch.isclose(table, row[None].to(table.dtype)).all(-1).any()

    ids, mask = batch(model_type)
    pm.eval()
    out = pm(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (3, 3)


@pytest.mark.parametrize("model_type", MODELS)
def test_prompt_is_P_plus_Q_and_commitment_by_hand(model_type):
    """Eval mode, nearest code (``sample_in_eval=False``): the prepended prompt is P + codebook[nearest(C~)],
    the loss w mean((C~ - Q)^2)."""
    pm = _attach(
        model_type, head="base", prompt_length=2, codebook_size=9, commitment_weight=0.3, sample_in_eval=False
    )
    pm.eval()
    m = pm.method
    ids, mask = batch(model_type)
    captured = []  # the last call is the prompted sequence (the method embeds the real tokens first)
    hook = pm.info.input_embeddings.register_forward_hook(lambda mod, a, o: captured.append(o))
    try:
        pm(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    with torch.no_grad():
        C = m.contextualize(pm.info.input_embeddings(ids), mask.bool())
        rows = F.normalize(C, dim=-1) * m.codebook_norm
        dist = ((rows[:, :, None, :] - m.quantizer.codebook[None, None]) ** 2).sum(-1)  # [B, p, K]
        Q = m.quantizer.codebook[dist.argmin(-1)]
        expected = m.prompt[None] + Q
        loss = 0.3 * ((rows - Q) ** 2).mean()
    emb = captured[-1]
    assert emb.shape[1] == 2 + ids.shape[1]
    torch.testing.assert_close(emb[:, :2], expected.to(emb.dtype), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(pm.last_aux_losses["vip_commitment"], loss, rtol=1e-4, atol=1e-4)


def test_contextualizer_ignores_padding_but_never_the_prompt():
    pm = _attach("bert", head="base")
    m = pm.method.eval()
    emb = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    c = m.contextualize(emb, mask)
    emb2 = emb.clone()
    emb2[0, 3:] = torch.randn(2, D) * 10  # change only padded positions of row 0
    c2 = m.contextualize(emb2, mask)
    torch.testing.assert_close(c[0], c2[0])
    assert not torch.allclose(c[1], m.contextualize(emb2 + 1, mask)[1])
    # all tokens padded: the prompt rows still attend to each other (no NaN)
    assert torch.isfinite(m.contextualize(emb, torch.zeros(2, 5, dtype=torch.bool))).all()


# -- training behaviour --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_loss_includes_commitment_and_only_method_gets_gradients(model_type):
    pm = _attach(model_type, head="cls")
    pm.train()
    ids, mask = batch(model_type)
    labels = torch.tensor([0, 2, 1])
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    aux = pm.last_aux_losses
    assert set(aux) == {"vip_commitment"} and aux["vip_commitment"].dim() == 0
    assert aux["vip_commitment"].item() > 0
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels) + aux["vip_commitment"])
    out.loss.backward()
    for name, prm in pm.model.named_parameters():
        assert prm.grad is None, name
    for name, prm in pm.method.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


@pytest.mark.parametrize("model_type", MODELS)
def test_straight_through_gradient_reaches_prompt_through_Q(model_type):
    """With no commitment loss, the contextualiser (only reachable through Q) gets gradients, and the
    prompt's gradient is more than the skip connection's share."""
    pm = _attach(model_type, head="cls", commitment_weight=0.0)
    pm.train()
    m = pm.method
    final = {}
    original = m.input_prompts

    def spy(ctx):
        out = original(ctx)
        out.retain_grad()
        final["prompt"] = out
        return out

    m.input_prompts = spy
    ids, mask = batch(model_type)
    out = pm(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert m.contextualizer_in.weight.grad.abs().sum() > 0
    assert m.contextualizer_out.weight.grad.abs().sum() > 0
    skip_share = final["prompt"].grad.sum(0)
    assert not torch.allclose(m.prompt.grad, skip_share)


@pytest.mark.parametrize("mode", ["sample", "nearest"])
def test_ema_codebook_updates_in_training_only(mode):
    pm = _attach("bert", head="base", mode=mode)
    ids, mask = batch("bert")
    before = copy.deepcopy(pm.method.quantizer.state_dict())
    pm.eval()
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=mask)
    for k, v in pm.method.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
    pm.train()
    pm(input_ids=ids, attention_mask=mask)
    assert not torch.equal(pm.method.quantizer.codebook, before["codebook"])
    assert not torch.equal(pm.method.quantizer.cluster_size, before["cluster_size"])


@pytest.mark.parametrize("ema", ["vip", "vqvae"])
def test_ema_update_by_hand(ema):
    """One training forward: the quantiser's buffers follow the EMA formula (METHODS.md for "vip") for
    the rows and codes of that forward."""
    pm = _attach(
        "bert",
        head="base",
        prompt_length=2,
        codebook_size=7,
        num_samples=3,
        ema=ema,
        ema_decay=0.9,
        ema_eps=0.1,
    )
    vq = pm.method.quantizer
    assert isinstance(vq, VectorQuantizer)
    assert (
        vq.mode,
        vq.codebook_size,
        vq.num_samples,
        vq.temperature,
        vq.decay,
        vq.eps,
        vq.commitment_weight,
    ) == (
        "sample",
        7,
        3,
        pm.method.temperature,
        0.9,
        0.1,
        0.1,
    )
    before = {k: v.clone().double() for k, v in vq.state_dict().items()}
    seen = {}
    original = vq.update

    def spy(x, indices):
        seen["rows"], seen["idx"] = x.detach().double().reshape(-1, D), indices.reshape(-1, 3)
        return original(x, indices)

    vq.update = spy
    pm.train()
    ids, mask = batch("bert")
    pm(input_ids=ids, attention_mask=mask)
    rows, idx = seen["rows"], seen["idx"]
    assert rows.shape == (3 * 2, D)
    K, S, g, eps = 7, 3, 0.9, 0.1
    counts = torch.zeros(K, dtype=torch.float64)
    sums = torch.zeros(K, D, dtype=torch.float64)
    for i in range(rows.shape[0]):
        for s in range(S):
            counts[idx[i, s]] += 1
            sums[idx[i, s]] += rows[i]
    N = g * before["cluster_size"] + (1 - g) * counts / S
    smoothed = (N + eps) / (N.sum() + K * eps) * N.sum()
    if ema == "vip":
        codes = g * before["codebook"] + (1 - g) * (sums / S) / smoothed[:, None]
        torch.testing.assert_close(vq.cluster_size.double(), smoothed, rtol=1e-5, atol=1e-6)
    else:
        M = g * before["embed_sum"] + (1 - g) * sums / S
        codes = M / smoothed[:, None]
        torch.testing.assert_close(vq.embed_sum.double(), M, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vq.codebook.double(), codes, rtol=1e-5, atol=1e-4)


def test_sampling_draws_num_samples_codes_per_row():
    pm = _attach("bert", head="base", prompt_length=2, num_samples=4, codebook_size=6)
    pm.train()
    ids, mask = batch("bert")
    seen = {}
    original = pm.method.quantize

    def spy(rows):
        out = original(rows)
        seen["idx"] = out[1]
        seen["q"] = out[0]
        return out

    pm.method.quantize = spy
    pm(input_ids=ids, attention_mask=mask)
    assert seen["idx"].shape == (3, 2, 4)
    assert seen["idx"].min() >= 0 and seen["idx"].max() < 6


# -- persistence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_save_load_round_trip(model_type, tmp_path):
    pm = _attach(model_type, head="cls")
    ids, mask = batch(model_type)
    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    with torch.no_grad():
        for prm in pm.method.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    pm.eval()
    loaded = assert_save_load_round_trip(pm, model_type, tmp_path, VIP)
    assert torch.equal(loaded.method.quantizer.codebook, pm.method.quantizer.codebook)


def test_causal_lm_loss_and_generate():
    pm = _attach("llama", head="lm")
    ids, _ = batch("llama", pad_last=0)
    pm.train()
    out = pm(input_ids=ids, labels=ids)
    assert out.logits.shape[:2] == (3, 3 + 7)
    assert "vip_commitment" in pm.last_aux_losses
    pm.eval()
    gen = pm.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 10)


# -- scales and the evaluation path ----------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_skip_and_quantised_parts_have_comparable_norms_at_init(model_type):
    """Both terms of P + Q matter at initialisation: their row norms are within a factor 3 (with the
    paper's norm 100 on a model whose embedding rows have norm ~0.1, Q was ~1000 times P)."""
    pm = _attach(model_type, head="base")
    pm.train()
    seen = {}
    original = pm.method.quantize

    def spy(rows):
        out = original(rows)
        seen["q"] = out[0].detach()
        return out

    pm.method.quantize = spy
    ids, mask = batch(model_type)
    pm(input_ids=ids, attention_mask=mask)
    p_norm = pm.method.prompt.detach().norm(dim=-1).mean().item()
    q_norm = seen["q"].norm(dim=-1).mean().item()
    assert 1 / 3 < q_norm / p_norm < 3, (p_norm, q_norm)
    # and the code distribution is not uniform: with τ rescaled, the sampled codes are concentrated
    # (a uniform draw of 10 codes out of 30 would average to a row norm well below the codes' norm)
    assert q_norm > 0.5 * pm.method.codebook_norm


@pytest.mark.parametrize("model_type", MODELS)
def test_eval_uses_the_training_quantiser_path_seeded(model_type):
    """Eval draws S codes and averages them, as training does, from a generator seeded with eval_seed:
    repeated eval forwards agree exactly, the codebook is untouched, and Q is vq_sample's output."""
    from prompt_kernels.ops.vq import vq_sample

    pm = _attach(model_type, head="base", prompt_length=2, num_samples=4, codebook_size=6, eval_seed=11)
    m = pm.method
    seen = {}
    original = m.quantize

    def spy(rows):
        out = original(rows)
        seen["rows"], seen["q"], seen["idx"] = rows.detach(), out[0].detach(), out[1]
        return out

    m.quantize = spy
    ids, mask = batch(model_type)
    pm.eval()
    before = m.quantizer.codebook.clone()
    with torch.no_grad():
        a = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        q_a = seen["q"]
        b = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen["idx"].shape == (3, 2, 4)  # S samples per row, as in training
    assert torch.equal(a, b)
    assert torch.equal(m.quantizer.codebook, before)
    ref = vq_sample(
        seen["rows"],
        before,
        4,
        m.temperature,
        generator=torch.Generator().manual_seed(11),
        commitment_weight=0.1,
    )
    torch.testing.assert_close(q_a, ref.quantized)
    torch.testing.assert_close(q_a, before[seen["idx"]].mean(-2))
