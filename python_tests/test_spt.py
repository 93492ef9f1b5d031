"""SPT: the prompt generator, the config, the gated propagation, the consistency loss, the bi-level
search, selection and retraining, save/load, on a tiny random BERT and a tiny Llama (2 layers, d = 32)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prompt_kernels
from prompt_kernels import _backend
from prompt_kernels.configs import config_from_dict
from prompt_kernels.methods import spt
from prompt_kernels.methods.spt import SPTConfig
from prompt_kernels.nn import PromptGenerator
from prompt_kernels.ops.reference import phm_linear as phm_linear_reference
from prompt_kernels.ops.reference import prompt_pool as prompt_pool_reference

D, L, P, VOCAB = 32, 2, 3, 100


def make_model(kind: str, classifier: bool = False):
    """A tiny random model, identical for every call with the same arguments."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        LlamaConfig,
        LlamaModel,
    )

    with torch.random.fork_rng():
        torch.manual_seed(1234)
        if kind == "bert":
            cfg = BertConfig(
                vocab_size=VOCAB,
                hidden_size=D,
                num_hidden_layers=L,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                num_labels=2,
            )
            return (BertForSequenceClassification if classifier else BertModel)(cfg)
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        return LlamaModel(cfg)


def batch(b=3, t=7):
    ids = torch.randint(1, VOCAB, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 2 :] = 0  # padding
    return ids, mask


def config(**kw):
    base = dict(prompt_length=P, bottleneck=8, phm_n=4)
    base.update(kw)
    return SPTConfig(**base)


KINDS = ["bert", "llama"]
STYLES = ["prefix", "sequence"]


# ----------------------------------------------------------------------------- generator
def _phm_matrix(lin):
    eye = torch.eye(lin.in_features, dtype=torch.float64)
    return phm_linear_reference(eye, lin.rules.double(), lin.weights.double())


def test_pool_commutes_with_the_projection():
    """Pool(X W + b) = Pool(X) W + b for rows with at least one real token (why we pool first)."""
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [0, 1, 0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    w, b = torch.randn(16, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    for p in (1, 3, 4, 11):
        lhs = prompt_pool_reference(x @ w + b, mask, p)
        rhs = prompt_pool_reference(x, mask, p) @ w + b
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_generator_matches_its_definition():
    gen = PromptGenerator(D, 5, bottleneck=8, n=4, activation="gelu", dropout=0.1).eval()
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out = gen(x, mask)
    assert out.shape == (2, 5, D) and out.dtype == torch.float32
    xd = x.double()
    h = prompt_pool_reference(xd @ _phm_matrix(gen.down) + gen.down.bias.double(), mask, 5)
    ref = torch.nn.functional.gelu(h) @ _phm_matrix(gen.up) + gen.up.bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    gen.train()
    assert not torch.equal(gen(x, mask), gen(x, mask))  # dropout on the output while training


def test_generator_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        PromptGenerator(30, 3, bottleneck=8, n=4)
    with pytest.raises(ValueError, match="activation"):
        PromptGenerator(D, 3, activation="swish2")
    with pytest.raises(ValueError, match="prompt_length"):
        PromptGenerator(D, 0)


def test_generator_on_cpu_runs_the_cpp_ops(monkeypatch):
    calls = []
    select = _backend.select

    def recording(op, device, has_cpp):
        backend = select(op, device, has_cpp)
        calls.append((op, backend))
        return backend

    monkeypatch.setattr(_backend, "select", recording)
    gen = PromptGenerator(D, P, bottleneck=8, n=4)
    x = torch.randn(2, 6, D, requires_grad=True)
    with prompt_kernels.use_backend("cpp"):
        out = gen(x, torch.ones(2, 6, dtype=torch.bool))
        out.square().sum().backward()
    assert ("phm_linear", "cpp") in calls and ("prompt_pool", "cpp") in calls
    assert len(calls) >= 6  # 2 x phm + pool, forward and backward
    assert {b for _, b in calls} == {"cpp"}
    assert x.grad is not None and gen.down.rules.grad is not None


# ----------------------------------------------------------------------------- config
def test_config_round_trip_and_validation():
    c = SPTConfig(prompt_length=4, lambda_=0.5, style="sequence", selected_layers=[3, 1, 3], gate_lr=0.1)
    assert c.selected_layers == [1, 3]
    default = SPTConfig()
    assert (default.gate_lr, default.gate_travel, default.representation, default.retrain_from) == (
        None,
        8.0,
        "pooled",
        "scratch",
    )
    assert default.gate_warmup == 0.0
    other = SPTConfig(representation="first", retrain_from="scratch", gate_travel=3.0)
    assert SPTConfig.from_json(other.to_json()) == other
    d = json.loads(c.to_json())
    assert d["method"] == "spt"
    assert config_from_dict(d) == c and SPTConfig.from_json(c.to_json()) == c
    assert prompt_kernels.SPTConfig is SPTConfig
    for bad, exc in [
        (dict(style="input"), ValueError),
        (dict(lambda_=1.5), ValueError),
        (dict(bottleneck=10, phm_n=4), ValueError),
        (dict(mask_rate=-0.1), ValueError),
        (dict(dropout=1.0), ValueError),
        (dict(budget_k=0), ValueError),
        (dict(gate_lr=0.0), ValueError),
        (dict(gate_travel=0.0), ValueError),
        (dict(gate_warmup=1.0), ValueError),
        (dict(gate_beta2=1.0), ValueError),
        (dict(gate_warmup=-0.1), ValueError),
        (dict(representation="cls"), ValueError),
        (dict(retrain_from="warm"), ValueError),
        (dict(selected_layers=[]), ValueError),
        (dict(selected_layers=[-1]), ValueError),
        (dict(activation="swish2"), ValueError),
        (dict(budget_k=2.0), TypeError),
    ]:
        with pytest.raises(exc):
            SPTConfig(**bad)
    with pytest.raises(ValueError, match="out of range"):
        prompt_kernels.attach(make_model("bert"), config(selected_layers=[L]))


# ----------------------------------------------------------------------------- gates
@pytest.mark.parametrize("kind", KINDS)
def test_reparameterised_gates_values_and_gradient(kind):
    pm = prompt_kernels.attach(make_model(kind), config(consistency_weight=0.0))
    method = pm.method
    with torch.no_grad():
        method.gate_logits.copy_(torch.randn(L))
    a = torch.sigmoid(method.gate_logits)
    torch.testing.assert_close(method.reparameterised_gates(), a, rtol=0, atol=1e-7)

    method.record_prompts = True
    ids, mask = batch()
    out = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = (out * torch.randn_like(out)).sum()
    g_gates, g_alpha = torch.autograd.grad(loss, [method.last_gates, method.gate_logits])
    torch.testing.assert_close(method.last_gates.detach(), a.detach(), rtol=0, atol=1e-7)
    a = a.detach()
    s = a.sum()
    closed = a * (1 - a) * (g_gates - (g_gates * a).sum() / s)
    torch.testing.assert_close(g_alpha, closed, rtol=1e-4, atol=1e-6)
    # The coupling is real: without it the gradient would be a (1 - a) g.
    assert not torch.allclose(g_alpha, a * (1 - a) * g_gates, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", STYLES)
def test_gate_zero_passes_the_prompt_through(kind, style):
    pm = prompt_kernels.attach(make_model(kind), config(style=style, lambda_=0.7)).eval()
    pm.method.record_prompts = True
    pm.method.gate_mask = torch.tensor([1.0, 0.0])  # a_1 = 0
    ids, mask = batch()
    pm(input_ids=ids, attention_mask=mask)
    prompts = pm.method.last_prompts
    assert set(prompts) == {0, 1}
    assert prompts[0].abs().sum() > 0
    if style == "prefix":
        assert torch.equal(prompts[1], prompts[0])
    else:  # P^0 rows after layer 0 enter layer 1 unchanged
        assert not torch.equal(prompts[1], prompts[0])
        pm.method.gate_mask = torch.tensor([1.0, 0.0])
        rows_out = {}
        hook = pm.info.layers[
            0
        ].register_forward_hook(  # runs before the PromptedModel's own hook
            lambda m, a, o: rows_out.update({0: (o if torch.is_tensor(o) else o[0])[:, :P].detach()}),
            prepend=True,
        )
        pm(input_ids=ids, attention_mask=mask)
        hook.remove()
        assert torch.equal(pm.method.last_prompts[1], rows_out[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", STYLES)
def test_gate_one_with_lambda_one_gives_the_generator_output(kind, style):
    pm = prompt_kernels.attach(make_model(kind), config(style=style, lambda_=1.0)).eval()
    with torch.no_grad():
        pm.method.gate_logits.copy_(torch.tensor([0.3, 100.0]))  # a_1 = σ(100) = 1 in float32
    pm.method.record_prompts = True
    ids, mask = batch()
    out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    x1 = out.hidden_states[1][:, -ids.shape[1] :]  # the real tokens entering layer 1
    g1 = pm.method.generators["1"](x1, mask.bool())
    assert pm.method.last_gates[1].item() == 1.0
    assert torch.equal(pm.method.last_prompts[1], g1)
    g0 = pm.method.generators["0"](out.hidden_states[0][:, -ids.shape[1] :], mask.bool())
    assert torch.equal(pm.method.last_prompts[0], pm.method.last_gates[0] * g0)


@pytest.mark.parametrize("kind", KINDS)
def test_all_gates_masked_prefix_prompts_are_zero(kind):
    pm = prompt_kernels.attach(make_model(kind), config()).eval()
    pm.method.record_prompts = True
    pm.method.gate_mask = torch.zeros(L)
    ids, mask = batch()
    pm(input_ids=ids, attention_mask=mask)
    for layer in range(L):
        assert torch.equal(pm.method.last_prompts[layer], torch.zeros_like(pm.method.last_prompts[layer]))


# ----------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", STYLES)
def test_consistency_loss(kind, style):
    pm = prompt_kernels.attach(make_model(kind), config(style=style, mask_rate=0.0, dropout=0.3)).train()
    ids, mask = batch()
    pm(input_ids=ids, attention_mask=mask)
    assert set(pm.last_aux_losses) == {"spt_consistency"}
    assert pm.last_aux_losses["spt_consistency"].item() == 0.0  # mask keeps every gate; dropout replayed

    pm.method.config.mask_rate = 1.0  # every gate dropped in the masked run
    out = pm(input_ids=ids, attention_mask=mask)
    c = pm.last_aux_losses["spt_consistency"]
    assert c.item() > 0
    c.backward()
    assert pm.method.gate_logits.grad is not None and pm.method.generators["0"].up.weights.grad is not None
    assert out.last_hidden_state.shape == (ids.shape[0], ids.shape[1], D)

    pm.eval()
    pm(input_ids=ids, attention_mask=mask)
    assert pm.last_aux_losses == {}
    with pm.method.consistency(False):
        pm.train()
        pm(input_ids=ids, attention_mask=mask)
        assert pm.last_aux_losses == {}


def test_consistency_is_added_to_the_loss_with_labels():
    pm = prompt_kernels.attach(make_model("bert", classifier=True), config(mask_rate=1.0, dropout=0.0))
    pm.train()
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1])
    torch.manual_seed(5)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    aux = pm.last_aux_losses["spt_consistency"]
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, task + aux)
    assert aux.item() > 0


def test_classification_hidden_picks_cls_or_last_real_token():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    out = {"last_hidden_state": h}
    assert torch.equal(spt.classification_hidden(out, mask, causal=True), torch.stack([h[0, 2], h[1, 4]]))
    assert torch.equal(spt.classification_hidden(out, mask, causal=False), torch.stack([h[0, 0], h[1, 2]]))
    assert torch.equal(spt.classification_hidden({"logits": h[:, 0]}, mask, causal=False), h[:, 0])


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", STYLES)
def test_only_method_parameters_get_gradients(kind, style):
    pm = prompt_kernels.attach(make_model(kind), config(style=style)).train()
    ids, mask = batch()
    out = pm(input_ids=ids, attention_mask=mask)
    (out.last_hidden_state.square().mean() + sum(pm.last_aux_losses.values())).backward()
    for name, p in pm.model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for name, p in pm.method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert {id(p) for p in pm.prompt_parameters()} == {id(p) for p in pm.method.parameters()}
    n_gen = 2 * (4 * 4 * 4) + 4 * (D // 4) * (8 // 4) * 2 + 8 + D
    assert pm.num_trainable_parameters == L * n_gen + L


# ----------------------------------------------------------------------------- search and retraining
def _toy_task(kind):
    pm = prompt_kernels.attach(make_model(kind), config(dropout=0.0))
    head = torch.nn.Linear(D, 2)
    data = [(*batch(), torch.randint(0, 2, (3,))) for _ in range(4)]

    def loss_fn(pm_, head_, b):
        ids, mask, y = b
        h = pm_(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.nn.functional.cross_entropy(head_(h[:, 0]), y)

    return pm, head, data, loss_fn


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_bilevel_steps_update_only_their_parameters(kind):
    pm, head, data, task_loss = _toy_task(kind)
    omega, alpha = spt.omega_parameters(pm, head), spt.alpha_parameters(pm)
    assert len(alpha) == 1 and alpha[0] is pm.method.gate_logits
    assert {id(p) for p in omega} & {id(p) for p in alpha} == set()
    assert len(omega) == 6 * L + 2  # 2 PHM layers x (rules, weights, bias) per generator + head
    seen = []

    def loss_fn(pm_, head_, b):
        seen.append(
            (_snapshot(omega), _snapshot(alpha), [p.requires_grad for p in omega], alpha[0].requires_grad)
        )
        return task_loss(pm_, head_, b)

    record = spt.search(pm, head, iter(data[:2]), iter(data[2:]), 2, loss_fn, lr=1e-2, gate_lr=0.1)
    assert len(seen) == 4
    (w0, a0, w0_grad, a0_grad), (w1, a1, w1_grad, a1_grad) = seen[0], seen[1]
    assert all(w0_grad) and not a0_grad  # ω step: α frozen
    assert not any(w1_grad) and a1_grad  # α step: ω frozen
    assert _same(a0, a1) and not _same(w0, w1)  # the ω step changed ω only
    w2, a2 = seen[2][0], seen[2][1]
    assert _same(w1, w2) and not _same(a1, a2)  # the α step changed α only
    assert all(p.requires_grad for p in omega + alpha)  # flags restored
    assert record.search_steps == 2 and len(record.gate_trajectory) == 3
    assert record.gate_trajectory[0] == [0.5] * L
    assert record.gate_trajectory[-1] == pytest.approx(torch.sigmoid(pm.method.gate_logits).tolist())


def test_epoch_halves_split_each_epoch():
    it = spt.epoch_halves(10, 2, seed=0)
    pairs = [next(it) for _ in range(4)]  # 2 batches per half per epoch, 2 epochs
    for epoch in (pairs[:2], pairs[2:]):
        d1 = {i for a, _ in epoch for i in a}
        d2 = {i for _, b in epoch for i in b}
        assert not d1 & d2 and len(d1) == len(d2) == 4
    with pytest.raises(ValueError):
        next(spt.epoch_halves(1, 2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", STYLES)
def test_select_build_retrain_save_load(kind, style, tmp_path):
    pm = prompt_kernels.attach(make_model(kind), config(style=style, dropout=0.0, budget_k=1))
    head = torch.nn.Linear(D, 2)
    ids, mask = batch()
    data = [(ids, mask, torch.tensor([0, 1, 1]))] * 3

    def loss_fn(pm_, head_, b):
        h = pm_(input_ids=b[0], attention_mask=b[1]).last_hidden_state
        return torch.nn.functional.cross_entropy(head_(h[:, 0]), b[2])

    with torch.no_grad():
        pm.method.gate_logits.copy_(torch.tensor([0.2, -0.4]))
    # Save / load of the searched super-network.
    pm.eval()
    ref = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    pm.save_prompts(tmp_path / "searched")
    loaded = prompt_kernels.load_prompts(make_model(kind), tmp_path / "searched").eval()
    assert loaded.method.discrete is False
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).last_hidden_state, ref, rtol=0, atol=0
    )

    assert spt.select_layers(pm) == [0]
    assert spt.select_layers(pm, 2) == [0, 1] and spt.select_layers(pm, 5) == [0, 1]
    searched = {k: v.clone() for k, v in pm.method.state_dict().items()}
    discrete = spt.build_discrete(pm, [1], from_searched=True)
    assert discrete.prompt_config.selected_layers == [1]
    assert set(discrete.method.generators.keys()) == {"1"}
    assert "gate_logits" not in dict(discrete.method.named_parameters())
    for k, v in discrete.method.state_dict().items():
        assert torch.equal(v, searched[k]), k
    if style == "sequence":
        assert discrete.method.sequence_layer == 1
    discrete.method.record_prompts = True
    discrete.eval()
    discrete(input_ids=ids, attention_mask=mask)
    assert set(discrete.method.last_prompts) == {1}  # no prompt before the first selected layer

    before = _snapshot(discrete.method.parameters())
    opt = spt.retrain(discrete, head, iter(data), 3, loss_fn, lr=1e-2)
    assert not _same(before, discrete.method.parameters())
    assert len(opt.param_groups[0]["params"]) == 6 + 2
    assert discrete.last_aux_losses == {}  # no consistency loss in the discrete model

    discrete.eval()
    ref = discrete(input_ids=ids, attention_mask=mask).last_hidden_state
    record = spt.SearchRecord(
        gate_trajectory=[[0.5, 0.5]], selected_layers=[1], search_steps=1, retrain_steps=3
    )
    discrete.save_prompts(tmp_path / "retrained")
    record.save(tmp_path / "retrained")
    loaded = prompt_kernels.load_prompts(make_model(kind), tmp_path / "retrained").eval()
    assert loaded.prompt_config.selected_layers == [1] and set(loaded.method.generators.keys()) == {"1"}
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).last_hidden_state, ref, rtol=0, atol=0
    )
    assert spt.SearchRecord.load(tmp_path / "retrained") == record


def test_search_and_retrain_end_to_end(tmp_path):
    pm, head, data, loss_fn = _toy_task("bert")
    pairs = iter([(data[0], data[1]), (data[2], data[3])] * 2)
    discrete, record, _ = spt.search_and_retrain(
        pm, head, pairs, iter(data * 2), 2, 2, loss_fn, k=1, out=str(tmp_path / "run")
    )
    assert len(record.selected_layers) == 1 and record.search_steps == 2 and record.retrain_steps == 2
    gates = record.gate_trajectory[-1]
    assert record.selected_layers == [max(range(L), key=lambda i: (gates[i], -i))]
    assert set(discrete.method.generators.keys()) == {str(record.selected_layers[0])}
    saved = json.load(open(tmp_path / "run" / "config.json"))["prompt_config"]
    assert saved["selected_layers"] == record.selected_layers
    assert json.load(open(tmp_path / "run" / spt.SEARCH_FILE))["selected_layers"] == record.selected_layers
    with pytest.raises(ValueError, match="super-network"):
        spt.search(discrete, head, iter(data), iter(data), 1, loss_fn)


def test_command_line_search_then_retrain(tmp_path, capsys):
    import csv

    from transformers import AutoTokenizer, BertConfig, BertModel

    from prompt_kernels import cli
    from prompt_kernels.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(
            BertConfig(
                vocab_size=tok.vocab_size,
                hidden_size=D,
                num_hidden_layers=L,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        ).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with open(tmp_path / "task.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        w.writerows(
            (f"a {x} movie {i}", lab) for i in range(6) for x, lab in (("good", "pos"), ("bad", "neg"))
        )
    out = tmp_path / "run"
    argv = ["train", "--no-progress", "--method", "spt", "--model", str(tmp_path / "model")]
    argv += [
        "--task",
        str(tmp_path / "task.csv"),
        "--batch-size",
        "2",
        "--max-length",
        "12",
        "--prompt-length",
        "2",
    ]
    assert cli.main([*argv, "--steps", "5", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "spt" and result["steps"] == 5
    record = json.load(open(out / spt.SEARCH_FILE))
    assert (
        record["search_steps"] == 2 and record["retrain_steps"] == 3 and len(record["gate_trajectory"]) == 3
    )
    assert record["selected_layers"] == [0, 1]  # budget_k = 4 >= L
    assert record["gate_lr"] == pytest.approx(8.0 / 2)  # the default budget, no flag needed
    assert record["retrain_from"] == "scratch"
    assert json.load(open(out / "config.json"))["prompt_config"]["selected_layers"] == [0, 1]
    assert cli.main([*argv, "--steps", "1", "--out", str(out), "--resume", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6


def test_prompt_magnitude_at_init_is_finite():
    pm = prompt_kernels.attach(make_model("bert"), config()).eval()
    pm.method.record_prompts = True
    ids, mask = batch()
    pm(input_ids=ids, attention_mask=mask)
    norms = [pm.method.last_prompts[i].norm(dim=-1).mean().item() for i in range(L)]
    assert all(math.isfinite(n) and n > 0 for n in norms)


# ----------------------------------------------------------------------------- the search decides
def test_search_optimisers_split_and_default_gate_learning_rate():
    """ω (generators + head) and α (the gate logits) get separate optimisers; α's learning rate is
    config.gate_lr, else gate_travel / the number of gate steps."""
    pm, head, data, loss_fn = _toy_task("bert")
    opt_w, opt_a = spt.search_optimizers(pm, head, lr=1e-3, gate_lr=0.25)
    (group_a,) = opt_a.param_groups
    assert group_a["params"] == [pm.method.gate_logits] and group_a["lr"] == 0.25
    assert isinstance(opt_a, torch.optim.Adam) and group_a["weight_decay"] == 0
    assert group_a["betas"] == (0.9, pm.method.config.gate_beta2)
    w_params = [p for g in opt_w.param_groups for p in g["params"]]
    assert all(p is not pm.method.gate_logits for p in w_params)
    assert {id(p) for p in w_params} == {id(p) for p in spt.omega_parameters(pm, head)}
    assert opt_w.param_groups[0]["lr"] == 1e-3
    cfg = pm.method.config
    assert spt.gate_learning_rate(cfg, 50) == pytest.approx(8.0 / 50)
    assert spt.gate_learning_rate(dataclasses_replace(cfg, gate_lr=0.03), 50) == 0.03
    record = spt.search(pm, head, iter(data[:2]), iter(data[2:]), 2, loss_fn)
    assert record.gate_lr == pytest.approx(8.0 / 2)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_default_gate_budget_lets_the_gates_separate(kind):
    """With a steady gate gradient (a loss that rewards gate 0), the default learning rate lets α move by
    several units over the search (Adam: about gate_travel / steps per step while the gradient keeps its
    size; the sigmoid's shrinking slope slows it near 0 / 1), the re-parameterisation pushing α_1 down.
    The old fixed 1e-2 moved it by at most 0.06 in 6 steps."""
    pm = prompt_kernels.attach(make_model(kind), config(dropout=0.0, consistency_weight=0.0))
    pm.method.record_prompts = True
    ids, mask = batch()

    def loss_fn(pm_, head_, b):
        out = pm_(input_ids=ids, attention_mask=mask).last_hidden_state
        return 0.0 * out.sum() - pm_.method.last_gates[0]

    steps = 6
    record = spt.search(pm, None, iter([None] * steps), iter([None] * steps), steps, loss_fn)
    alpha = pm.method.gate_logits.detach()
    travel = pm.method.config.gate_travel
    assert record.gate_lr == pytest.approx(travel / steps)
    first = torch.tensor(record.gate_trajectory[1]).logit()  # after one gate step: exactly one lr
    assert first[0].item() == pytest.approx(travel / steps, rel=1e-3)
    assert first[1].item() == pytest.approx(-travel / steps, rel=1e-3)
    assert alpha[0].item() > travel / 2 and (alpha[0] - alpha[1]).item() > travel
    assert record.gate_trajectory[-1][0] > 0.99 and record.gate_trajectory[-1][1] < 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_gate_steps_run_without_dropout(kind):
    """The ω step runs in training mode (dropout on); the α step with every module of pm and the head in
    eval mode; the modes are restored afterwards."""
    pm, head, data, task_loss = _toy_task(kind)
    pm.method.generators["0"].dropout.p = 0.5
    head = torch.nn.Sequential(torch.nn.Dropout(0.3), head)
    modes = []

    def loss_fn(pm_, head_, b):
        modes.append(
            (
                pm_.training,
                any(m.training for m in pm_.modules()),
                all(m.training for m in pm_.modules()),
                head_.training,
                head_[0].training,
            )
        )
        return task_loss(pm_, head_, b)

    pm.train()
    spt.search(pm, head, iter(data[:2]), iter(data[2:]), 2, loss_fn, lr=1e-2)
    omega_modes, alpha_modes = modes[0::2], modes[1::2]
    assert all(m == (True, True, True, True, True) for m in omega_modes)
    assert all(m == (False, False, False, False, False) for m in alpha_modes)
    assert pm.training and all(m.training for m in pm.modules()) and head.training
    pm.eval()
    spt.search(pm, head, iter(data[:1]), iter(data[1:2]), 1, loss_fn, lr=1e-2)
    assert not pm.training  # restored to what it was


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", STYLES)
def test_consistency_reaches_the_gates(kind, style, monkeypatch):
    """With a task loss that gives nothing to α, the consistency loss of the ω step alone moves the gates
    (its gradient is taken from the masked run through a copy of α); without it α stays put."""
    moved = {}
    for weight in (1.0, 0.0):
        pm = prompt_kernels.attach(
            make_model(kind), config(style=style, dropout=0.0, consistency_weight=weight)
        )
        monkeypatch.setattr(pm.method, "sample_consistency_mask", lambda: torch.tensor([1.0, 0.0]))
        ids, mask = batch()
        harvested = []

        def loss_fn(pm_, head_, b, ids=ids, mask=mask, harvested=harvested):
            out = pm_(input_ids=ids, attention_mask=mask).last_hidden_state
            if pm_.training:
                harvested.append(pm_.method._masked_logits)
            return 0.0 * out.sum()

        before = pm.method.gate_logits.detach().clone()
        spt.search(pm, None, iter([None] * 2), iter([None] * 2), 2, loss_fn, lr=1e-2)
        moved[weight] = (pm.method.gate_logits.detach() - before).abs().max().item()
        if weight:
            assert all(h is not None and h.grad is not None and h.grad.abs().sum() > 0 for h in harvested)
    assert moved[1.0] > 0.1 and moved[0.0] == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_consistency_compares_the_heads_representation(kind, monkeypatch):
    """The consistency loss is the MSE between the pooled final hidden states (mean of the real tokens
    for encoders, last real token for causal models: what the command line's head reads) of the masked
    and the full run; representation="first" compares the first real token ([CLS])."""
    for rep in ("pooled", "first"):
        model = make_model(kind)
        for m in model.modules():  # no dropout: the eval-mode runs below are the training runs
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        pm = prompt_kernels.attach(model, config(dropout=0.0, representation=rep))
        monkeypatch.setattr(pm.method, "sample_consistency_mask", lambda: torch.tensor([0.0, 1.0]))
        ids, mask = batch()
        pm.train()
        pm(input_ids=ids, attention_mask=mask)
        got = pm.last_aux_losses["spt_consistency"]
        pm.eval()
        with torch.no_grad():
            full = pm(input_ids=ids, attention_mask=mask).last_hidden_state
            pm.method.gate_mask = torch.tensor([0.0, 1.0])
            masked = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        rows = []
        for h in (full, masked):
            if kind == "llama":
                rows.append(torch.stack([h[b, real[b]][-1] for b in range(3)]))
            elif rep == "pooled":
                rows.append(torch.stack([h[b, real[b]].mean(0) for b in range(3)]))
            else:
                rows.append(h[:, 0])
        want = torch.nn.functional.mse_loss(rows[1], rows[0])
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-7)
    custom = prompt_kernels.attach(make_model(kind), config(dropout=0.0))
    custom.method.set_representation(lambda out, m: out.last_hidden_state[:, -1] * 0)
    custom.train()
    custom(input_ids=ids, attention_mask=mask)
    assert custom.last_aux_losses["spt_consistency"].item() == 0.0


def test_head_representation_from_logits_only():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    pooled = spt.head_representation({"last_hidden_state": h}, mask, causal=False)
    torch.testing.assert_close(pooled, torch.stack([h[0, :3].mean(0), h[1, 2:].mean(0)]))
    assert torch.equal(spt.head_representation({"logits": h[:, 0]}, mask, causal=False), h[:, 0])
    assert torch.equal(
        spt.head_representation({"last_hidden_state": h, "logits": h[:, 1]}, mask, False, "logits"), h[:, 1]
    )


@pytest.mark.parametrize("from_searched", [True, False])
def test_retrain_from_searched_or_scratch(from_searched):
    pm = prompt_kernels.attach(
        make_model("bert"), config(retrain_from="searched" if from_searched else "scratch")
    )
    searched = {k: v.clone() for k, v in pm.method.state_dict().items() if k.startswith("generators.1.")}
    discrete = spt.build_discrete(pm, [1])
    same = all(torch.equal(v, searched[k]) for k, v in discrete.method.state_dict().items())
    assert same == from_searched
    record = spt.SearchRecord(gate_trajectory=[[0.5, 0.5], [0.3, 0.9]], selected_layers=[1], gate_lr=0.1)
    assert record.gate_margin() == pytest.approx(0.6)


def test_gate_warmup_runs_omega_steps_only_first():
    """gate_warmup: the first round(f * steps) steps skip the α step (the gates stay at 0.5); the gate
    learning rate spreads gate_travel over the remaining gate steps."""
    pm, head, data, task_loss = _toy_task("bert")
    pm.method.config.gate_warmup = 0.5
    assert spt.warmup_steps(pm.method.config, 4) == 2 and spt.warmup_steps(pm.method.config, 1) == 0
    calls = []

    def loss_fn(pm_, head_, b):
        calls.append(pm_.training)
        return task_loss(pm_, head_, b)

    record = spt.search(pm, head, iter(data * 2), iter(data * 2), 4, loss_fn, lr=1e-2)
    assert calls == [True, True, True, False, True, False]  # ω, ω, ω+α, ω+α
    assert record.search_steps == 4 and len(record.gate_trajectory) == 3
    assert record.gate_lr == pytest.approx(8.0 / 2)
    assert record.gate_trajectory[0] == [0.5] * L and record.gate_trajectory[1] != [0.5] * L


@pytest.mark.parametrize("model_type", ["gemma3n_text", "qwen4_exp"])
def test_layers_without_token_hidden_states_are_refused_by_name(model_type):
    """Gemma 3n's layers carry extra hidden streams ([streams, B, T, d]); Qwen4-exp's another width: SPT's
    generators pool token hidden states [B, T, d], so the step says SPT cannot run there (no raw error)."""
    from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

    model = build_tiny(model_type, "causal-lm")
    pm = prompt_kernels.attach(model, SPTConfig(prompt_length=3)).train()
    with pytest.raises(NotImplementedError, match="SPT reads each layer's token hidden states"):
        pm(**tiny_inputs(model, "causal-lm"))


def test_layerdrop_skips_layers_of_the_chain():
    """LayerDrop (training) skips whole layers: the chain carries the prompt of the last layer that ran,
    each stack of an encoder-decoder its own (a skip used to raise "layers must run in order")."""
    from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

    model = build_tiny("bart", "seq2seq")
    model.config.encoder_layerdrop = model.config.decoder_layerdrop = 0.5
    model.model.encoder.layerdrop = model.model.decoder.layerdrop = 0.5
    pm = prompt_kernels.attach(model, SPTConfig(prompt_length=3, dropout=0.0, consistency_weight=0.0))
    pm.train()
    inputs = tiny_inputs(model, "seq2seq", batch=2, length=5)
    ran = []
    for seed in range(12):
        torch.manual_seed(seed)
        pm.method.record_prompts = True
        out = pm(**inputs)
        assert torch.isfinite(out.loss)
        ran.append(tuple(sorted(pm.method.last_prompts)))
        # Every decoder layer dropped: the encoder's output (and its prompts) never reach the loss.
        if out.loss.requires_grad:
            out.loss.backward()
    assert any(len(r) < 4 for r in ran), ran  # some layers were skipped
