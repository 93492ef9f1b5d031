"""attach / detach / save / load, configs, isolation between models, checkpointing, Trainer, aux losses."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import pytest
import torch
from patch_helpers import (
    AuxTestConfig,
    DeepPromptTestConfig,
    SequenceTestConfig,
    batch,
    main_output,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)
from transformers import PretrainedConfig, PreTrainedModel

import prompt_kernels as pk
from prompt_kernels.configs import config_from_dict, config_from_json, registered_configs
from prompt_kernels.ops import reference
from prompt_kernels.patch import attention as attn_mod


# -- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        pk.PromptTuningConfig(),
        pk.PromptTuningConfig(prompt_length=5, init="text", init_token_ids=[3, 4]),
        pk.PrefixTuningConfig(
            prompt_length=7, prefix_projection=True, projection_hidden_size=64, prefix_dropout=0.0
        ),
        pk.PrefixTuningConfig(trainable_head=True, attention_dropout="skip"),
    ],
)
def test_config_json_round_trip(cfg):
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert type(cfg).from_json(cfg.to_json()) == cfg
    assert config_from_json(cfg.to_json()) == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["method"] == cfg.method


@pytest.mark.parametrize(
    "cls,kwargs,err",
    [
        (pk.PromptTuningConfig, {"prompt_length": 0}, ValueError),
        (pk.PromptTuningConfig, {"prompt_length": 2.0}, TypeError),
        (pk.PromptTuningConfig, {"init": "zeros"}, ValueError),
        (pk.PromptTuningConfig, {"init": "text"}, ValueError),
        (pk.PromptTuningConfig, {"init_token_ids": [1, -2]}, ValueError),
        (pk.PromptTuningConfig, {"init_token_ids": []}, ValueError),
        (pk.PrefixTuningConfig, {"prefix_dropout": 1.0}, ValueError),
        (pk.PrefixTuningConfig, {"prefix_dropout": -0.1}, ValueError),
        (pk.PrefixTuningConfig, {"projection_hidden_size": 0}, ValueError),
        (pk.PrefixTuningConfig, {"prefix_projection": 1}, TypeError),
        (pk.PrefixTuningConfig, {"attention_dropout": "sometimes"}, ValueError),
        (pk.PrefixTuningConfig, {"trainable_head": "yes"}, TypeError),
    ],
)
def test_config_rejects_invalid_values(cls, kwargs, err):
    with pytest.raises(err):
        cls(**kwargs)


def test_config_registry_errors():
    with pytest.raises(ValueError, match="unknown prompt method"):
        config_from_dict({"method": "no_such_method", "prompt_length": 3})
    with pytest.raises(ValueError, match="method"):
        config_from_dict({"prompt_length": 3})
    with pytest.raises(ValueError, match="unknown field"):
        pk.PrefixTuningConfig.from_dict({"method": "prefix_tuning", "prompt_length": 3, "colour": "red"})
    with pytest.raises(ValueError, match="for method"):
        pk.PrefixTuningConfig.from_dict(pk.PromptTuningConfig().to_dict())
    assert {"prompt_tuning", "prefix_tuning"} <= set(registered_configs())


# -- refusing what is not supported -------------------------------------------------------------------------
class _OwnAttentionConfig(PretrainedConfig):
    model_type = "own_attention_test"


class _OwnAttentionModel(PreTrainedModel):
    """A model whose attention is computed in its own code: it never calls the attention interface."""

    config_class = _OwnAttentionConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(10, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        return (self.attn(x, x, x)[0],)


def test_model_without_the_attention_interface_is_refused_with_the_reason():
    model = _OwnAttentionModel(_OwnAttentionConfig())
    before = model.config
    with pytest.raises(ValueError, match="never calls transformers' attention interface"):
        pk.attach(model, pk.PrefixTuningConfig())
    assert model.config is before and model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        pk.attach(torch.nn.Linear(3, 3), pk.PrefixTuningConfig())
    with pytest.raises(TypeError, match="PromptConfig"):
        pk.attach(tiny_model("bert"), {"prompt_length": 3})


def test_attach_twice_is_refused_and_state_left_clean():
    model = tiny_model("llama", "lm")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=2))
    with pytest.raises(ValueError, match="already"):
        pk.attach(model, pk.PromptTuningConfig(prompt_length=2))
    assert model.config._attn_implementation == "prompt_kernels"
    pm.detach()
    with pytest.raises(RuntimeError, match="detached"):
        pm(input_ids=torch.tensor([[3, 4]]))


def test_other_attention_implementations_are_refused():
    model = tiny_model("llama", "lm")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        pk.attach(model, pk.PrefixTuningConfig())


# -- parameters, signature, aux losses ------------------------------------------------------------------------
def test_trainable_parameters_and_forward_signature():
    model = tiny_model("bert", "cls")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=5))
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    assert pm.num_trainable_parameters == 5 * 2 * L * d
    assert sum(p.numel() for p in pm.prompt_parameters()) == 5 * 2 * L * d
    params = inspect.signature(pm.forward).parameters
    assert "input_ids" in params and "labels" in params and "self" not in params
    assert pm.config is model.config and pm.prompt_config.prompt_length == 5
    pm.detach()

    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=5, trainable_head=True))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert pm.num_trainable_parameters == 5 * 2 * L * d + head
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not any(p.requires_grad for p in model.bert.parameters())
    pm.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_aux_losses_added_with_labels_and_exposed():
    model = tiny_model("bert", "cls")
    ids, mask = batch("bert")
    labels = torch.tensor([0, 1, 2])
    pm = pk.attach(model, AuxTestConfig(prompt_length=2))
    with pm.disabled():
        base = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    norm = (pm.method.prompt**2).sum()
    assert set(pm.last_aux_losses) == {"norm"}
    torch.testing.assert_close(pm.last_aux_losses["norm"], norm)
    without_aux = out.loss - norm
    assert abs(without_aux.item() - base.item()) > 0  # the prompt changed the task loss too
    out_tuple = pm(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(out_tuple[0], out.loss)
    out_nolabels = pm(input_ids=ids, attention_mask=mask)
    assert out_nolabels.loss is None and "norm" in pm.last_aux_losses
    pm.detach()

    # A forward started from aux_losses is nested (depth 1) and does not replace last_aux_losses.
    pm = pk.attach(model, AuxTestConfig(prompt_length=2, nested=True))
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert pm.method.depths == [0, 1] and pm._stack == []
    torch.testing.assert_close(pm.last_aux_losses["norm"], (pm.method.prompt**2).sum())


def test_input_style_user_positions_and_inputs_embeds():
    model = tiny_model("llama", "base")
    ids, mask = batch("llama")
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    pos = torch.arange(5, 5 + ids.shape[1])[None].expand(ids.shape[0], -1)
    a = pm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    emb = model.get_input_embeddings()(ids)
    b = pm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    torch.testing.assert_close(a, b)
    with pm.disabled():
        manual = model(
            inputs_embeds=torch.cat([pm.method.prompt[None].expand(ids.shape[0], -1, -1), emb], 1),
            attention_mask=torch.cat([torch.ones(ids.shape[0], 3, dtype=mask.dtype), mask], 1),
            position_ids=torch.cat([torch.zeros(ids.shape[0], 3, dtype=torch.long), pos], 1),
        ).last_hidden_state
    torch.testing.assert_close(a, manual)


@pytest.mark.parametrize("init", ["random", "vocab", "text"])
def test_prompt_tuning_init(init):
    model = tiny_model("bert")
    emb = model.get_input_embeddings().weight
    cfg = pk.PromptTuningConfig(prompt_length=5, init=init, init_token_ids=[7, 8] if init == "text" else None)
    pm = pk.attach(model, cfg)
    prompt = pm.method.prompt.detach()
    if init == "text":
        torch.testing.assert_close(prompt, emb[[7, 8, 7, 8, 7]])
    elif init == "vocab":
        assert all(((emb - row).abs().sum(1) == 0).any() for row in prompt)
    else:
        assert 0.5 < prompt.std() / emb.std() < 2


def test_prompt_tuning_text_init_with_tokenizer():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    model = tiny_model("bert")
    pm = pk.attach(
        model, pk.PromptTuningConfig(prompt_length=3, init="text", init_text="ab abcd"), tokenizer=Tok()
    )
    assert pm.prompt_config.init_token_ids == [2, 4]
    torch.testing.assert_close(pm.method.prompt.detach(), model.get_input_embeddings().weight[[2, 4, 2]])


# -- the hooks see the right tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_layer_inputs_are_the_layers_hidden_states(model_type):
    model = tiny_model(model_type)
    ids, mask = batch(model_type)
    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=2, gate=0.0, input_dependent=True))
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(pm.method.seen_inputs) == model.config.num_hidden_layers
    for seen, hs in zip(pm.method.seen_inputs, out.hidden_states):
        torch.testing.assert_close(seen, hs)


def test_sequence_style_matches_manual_bert():
    model = tiny_model("bert")
    ids, mask = batch("bert")
    p = 3
    pm = pk.attach(model, SequenceTestConfig(prompt_length=p, layer=1))
    out = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        B, T = ids.shape
        h = model.embeddings(input_ids=ids)
        m4 = mask.bool()[:, None, None, :].expand(B, 1, T, T)
        h = model.encoder.layer[0](h, m4)
        rows = pm.method.rows[None].expand(B, -1, -1)
        h = torch.cat([rows, h], 1)
        ext = torch.ones(B, 1, p + T, p + T, dtype=torch.bool)
        ext[:, :, :, p:] = mask.bool()[:, None, None, :]
        h = model.encoder.layer[1](h, ext)[:, p:]
    torch.testing.assert_close(out.detach(), h)


# -- prefix attention paths ---------------------------------------------------------------------------------
def test_dropout_path_matches_fused_path():
    """With dropout > 0 (training) the prompted layer concatenates and calls the wrapped implementation;
    with a vanishing dropout probability it must agree with the fused op, for a gate in (0, 1)."""
    torch.manual_seed(0)
    B, H, Hkv, T, S, P, Dh = 2, 4, 2, 5, 5, 3, 8
    q = torch.randn(B, H, T, Dh)
    k, v = torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)
    pk_, pv = torch.randn(1, Hkv, P, Dh), torch.randn(1, Hkv, P, Dh)
    gate = torch.rand(B, H)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, -2:] = False

    class Mod(torch.nn.Module):
        is_causal = True
        num_key_value_groups = H // Hkv

    for inner in ("sdpa", "eager"):
        mod = Mod()
        from transformers.models.llama import modeling_llama

        setattr(
            mod,
            attn_mod.BINDING_ATTR,
            attn_mod.AttentionBinding(inner, modeling_llama.eager_attention_forward, frozenset({0})),
        )
        causal = torch.arange(S)[None, :] <= torch.arange(T)[:, None]
        mask4 = causal[None, None] & pad[:, None, None, :]
        prefix = attn_mod.HostPrompts({0: attn_mod.LayerPrompt(pk_, pv, gate)})
        fused, _ = attn_mod.prompt_kernels_attention(
            mod, q, k, v, mask4, scaling=Dh**-0.5, dropout=0.0, **{attn_mod.PREFIX_KWARG: prefix}
        )
        mod.training = True
        concat, _ = attn_mod.prompt_kernels_attention(
            mod, q, k, v, mask4, scaling=Dh**-0.5, dropout=1e-12, **{attn_mod.PREFIX_KWARG: prefix}
        )
        torch.testing.assert_close(concat, fused, rtol=1e-5, atol=1e-5)
        ref = reference.gated_prefix_attention(q, k, v, pk_, pv, gate, pad, is_causal=True)
        torch.testing.assert_close(fused, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_attention_dropout_skip_uses_the_fused_op_in_training(model_type, monkeypatch):
    model = tiny_model(model_type)
    model.config.attention_probs_dropout_prob = 0.5
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
        if isinstance(getattr(m, "dropout", None), torch.nn.Dropout) and "Attention" in type(m).__name__:
            m.dropout.p = 0.5
    calls = []
    real = attn_mod.gated_prefix_attention
    monkeypatch.setattr(attn_mod, "gated_prefix_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = batch(model_type)
    for mode, expect in (("model", 0), ("skip", model.config.num_hidden_layers)):
        calls.clear()
        pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=2, attention_dropout=mode))
        pm.train()
        pm(input_ids=ids, attention_mask=mask)
        assert len(calls) == expect
        pm.eval()
        pm.detach()


# -- isolation -------------------------------------------------------------------------------------------------
def test_two_prompted_models_do_not_interfere_and_unprompted_is_untouched():
    a, b, c = (
        tiny_model("llama", "lm", seed=0),
        tiny_model("llama", "lm", seed=1),
        tiny_model("llama", "lm", seed=2),
    )
    ids, mask = batch("llama")
    with torch.no_grad():
        ref_c = c(input_ids=ids, attention_mask=mask).logits
    pa = pk.attach(a, pk.PrefixTuningConfig(prompt_length=3))
    pb = pk.attach(b, pk.PromptTuningConfig(prompt_length=2))
    with torch.no_grad():
        alone_a = pa(input_ids=ids, attention_mask=mask).logits
        alone_b = pb(input_ids=ids, attention_mask=mask).logits
    # Interleaved: a forward of b runs inside a forward of a (from a's layer hook).
    inner = []
    hook = a.model.layers[0].register_forward_pre_hook(
        lambda *args: inner.append(pb(input_ids=ids, attention_mask=mask).logits)
    )
    with torch.no_grad():
        both_a = pa(input_ids=ids, attention_mask=mask).logits
    hook.remove()
    torch.testing.assert_close(both_a, alone_a, rtol=0, atol=0)
    torch.testing.assert_close(inner[0], alone_b, rtol=0, atol=0)
    assert c.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(c(input_ids=ids, attention_mask=mask).logits, ref_c, rtol=0, atol=0)


# -- save / load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,head,cfg",
    [
        (
            "bert",
            "cls",
            pk.PrefixTuningConfig(prompt_length=3, prefix_projection=True, projection_hidden_size=8),
        ),
        ("bert", "cls", pk.PromptTuningConfig(prompt_length=3, trainable_head=True)),
        ("llama", "lm", pk.PrefixTuningConfig(prompt_length=3)),
        ("gpt2", "lm", pk.PromptTuningConfig(prompt_length=2, init="vocab")),
    ],
)
def test_save_load_identical_outputs(tmp_path, model_type, head, cfg):
    model = tiny_model(model_type, head, seed=5)
    ids, mask = batch(model_type)
    pm = pk.attach(model, cfg)
    pm.train()
    out = main_output(pm(input_ids=ids, attention_mask=mask)).float()
    (out * torch.randn_like(out)).sum().backward()
    torch.optim.SGD(pm.prompt_parameters(), lr=0.5).step()
    pm.eval()
    with torch.no_grad():
        ref = main_output(pm(input_ids=ids, attention_mask=mask))
    pm.save_prompts(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "prompts.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "prompts.safetensors")
    expected = sum(p.numel() for p in pm.prompt_parameters())
    assert sum(t.numel() for t in saved.values()) == expected

    fresh = tiny_model(
        model_type, head, seed=5
    )  # with trainable_head its (untrained) head gets the saved one
    loaded = pk.load_prompts(fresh, tmp_path)
    assert loaded.prompt_config == pm.prompt_config
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(loaded(input_ids=ids, attention_mask=mask)), ref, rtol=0, atol=0
        )


def test_load_onto_a_different_base_model_fails(tmp_path):
    pm = pk.attach(tiny_model("bert", "cls", seed=1), pk.PrefixTuningConfig(prompt_length=2))
    pm.save_prompts(tmp_path)
    with pytest.raises(ValueError, match=r"different base model.*backbone_weights"):
        pk.load_prompts(tiny_model("bert", "cls", seed=2), tmp_path)
    with pytest.raises(ValueError, match=r"different base model.*model_type"):
        pk.load_prompts(tiny_model("llama", "cls", seed=1), tmp_path)
    other = tiny_model("bert", "cls", seed=1, num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_layers"):
        pk.load_prompts(other, tmp_path)
    with pytest.raises(FileNotFoundError):
        pk.load_prompts(tiny_model("bert", "cls", seed=1), tmp_path / "nothing")
    # Same backbone, different (frozen, untrained) head: loads, with a warning.
    model = tiny_model("bert", "cls", seed=1)
    torch.nn.init.normal_(model.classifier.weight)
    with pytest.warns(UserWarning, match="task head"):
        pk.load_prompts(model, tmp_path).detach()


def test_load_rebuilds_registered_test_method(tmp_path):
    model = tiny_model("llama", seed=3)
    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=2, gate=0.5, layers=[1]))
    ids, mask = batch("llama")
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    pm.save_prompts(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["prompt_config"]["method"] == "deep_prompt_test"
    loaded = pk.load_prompts(tiny_model("llama", seed=3), tmp_path)
    assert dataclasses.asdict(loaded.prompt_config) == dataclasses.asdict(pm.prompt_config)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).last_hidden_state, ref, rtol=0, atol=0
        )


# -- gradient checkpointing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("style", ["prefix", "input", "sequence"])
def test_gradient_checkpointing_same_gradients(model_type, style):
    """Two forwards (different batches) before one backward: the recomputation of the first forward
    must see the first forward's prompts (SPT's consistency loss does exactly this)."""
    cfg = {
        "prefix": DeepPromptTestConfig(prompt_length=2, gate=0.7, input_dependent=True),
        "input": pk.PromptTuningConfig(prompt_length=2),
        "sequence": SequenceTestConfig(prompt_length=2, layer=0),
    }[style]
    ids1, mask1 = batch(model_type, seed=1)
    ids2, mask2 = batch(model_type, seed=2)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(model_type, dropout=False)
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        pm = pk.attach(model, cfg)
        pm.train()
        o1 = pm(input_ids=ids1, attention_mask=mask1).last_hidden_state
        o2 = pm(input_ids=ids2, attention_mask=mask2).last_hidden_state
        w1, w2 = (
            torch.randn(o1.shape, generator=torch.Generator().manual_seed(1)),
            torch.randn(o2.shape, generator=torch.Generator().manual_seed(2)),
        )
        ((o1 * w1).sum() + (o2 * w2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in pm.method.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


# -- Trainer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_runs_a_few_steps(tmp_path, checkpointing):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert", "cls")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    before_prompt = pm.method.embedding.weight.detach().clone()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(3, 99, (6,), generator=g),
            "attention_mask": torch.ones(6, dtype=torch.long),
            "labels": torch.tensor(i % 3),
            "unused_column": "x",
        }
        for i in range(16)
    ]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "unused_column"}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        gradient_checkpointing=checkpointing,
    )
    result = Trainer(model=pm, args=args, train_dataset=data, data_collator=collate).train()
    assert result.global_step == 3
    assert model.is_activation_checkpointing == checkpointing
    assert not torch.equal(pm.method.embedding.weight.detach(), before_prompt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("gate", [1.0, 0.5])
@pytest.mark.parametrize("pad", [0, 2])
def test_dropout_path_in_a_model_matches_eval(model_type, gate, pad):
    """Training with a vanishing attention dropout (the concatenation path) gives the eval outputs."""
    model = tiny_model(model_type, dropout=False)
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 1e-12
        if isinstance(getattr(m, "dropout", None), torch.nn.Dropout) and "Attention" in type(m).__name__:
            m.dropout.p = 1e-12
    ids, mask = batch(model_type, pad_last=pad)
    cfg = (
        pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0)
        if gate == 1.0
        else DeepPromptTestConfig(prompt_length=3, gate=gate)
    )
    pm = pk.attach(model, cfg)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        pm.train()
        out = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_errors_inside_a_forward_leave_no_state_behind():
    model = tiny_model("llama")
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=2))
    with pytest.raises(ValueError):
        pm(attention_mask=torch.ones(1, 3))  # neither input_ids nor inputs_embeds
    with pytest.raises(ValueError, match="2D attention_mask"):
        pm(input_ids=torch.tensor([[3, 4, 5]]), attention_mask=torch.ones(1, 1, 3, 3))
    assert pm._stack == []
    ids, mask = batch("llama")
    pm(input_ids=ids, attention_mask=mask)
    assert pm._stack == []


def test_bfloat16_model():
    model = tiny_model("llama", "lm").to(torch.bfloat16)
    ids, mask = batch("llama")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=2, gate=0.0))
    out = pm(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    pm.detach()
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=2))
    pm.train()
    pm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert pm.method.embedding.weight.grad.dtype == torch.float32


def test_input_style_leaves_multilabel_float_labels_alone():
    model = tiny_model("bert", "cls")
    ids, mask = batch("bert", T=3)
    model.config.problem_type = "multi_label_classification"
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=2))
    labels = torch.rand(ids.shape[0], 3)  # [B, num_labels] with num_labels == T
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, ref)


def test_attach_leaves_a_shared_config_object_alone():
    """Two models built from one config object: attaching to one changes nothing the other sees."""
    from transformers import LlamaForCausalLM

    first = tiny_model("llama", "lm")
    shared = first.config
    second = LlamaForCausalLM(shared)
    ids, mask = batch("llama")
    with torch.no_grad():
        ref = second(input_ids=ids, attention_mask=mask).logits
    pm = pk.attach(first, pk.PrefixTuningConfig(prompt_length=2))
    assert shared._attn_implementation == "sdpa" and first.config is not shared
    assert first.config._attn_implementation == "prompt_kernels"
    with torch.no_grad():  # the unattached model still runs its own attention
        torch.testing.assert_close(second(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
    assert pm.detach().config is shared
    assert all(m.config is shared for m in first.modules() if hasattr(m, "config") and m is not first)


def test_a_refused_method_leaves_the_model_as_it_was():
    """GPC (sequence style) refused on an encoder-decoder after the probe ran: the model keeps its
    config object, attention implementation, flags, and has no binding or hook left; prefix tuning
    attaches to it afterwards."""
    from prompt_kernels.testing.tiny_models import build_tiny

    model = build_tiny("t5", "seq2seq")
    config, impl = model.config, model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="sequence-style prompts need a single stack"):
        pk.attach(model, pk.GPCConfig(prompt_length=2))
    assert model.config is config and model.config._attn_implementation == impl
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    pk.attach(model, pk.PrefixTuningConfig(prompt_length=2)).detach()


@pytest.mark.parametrize("model_type,mapping", [("falcon_h1", "causal-lm"), ("layoutlm", "seq-cls")])
def test_sequence_style_refused_at_attach_where_layers_cannot_take_the_rows(model_type, mapping):
    """A hybrid whose state-space branch masks its input with the 2D mask (Falcon-H1) and an encoder
    with per-token layout inputs (LayoutLM) cannot take sequence-style rows: attach refuses with the
    layers' error (a probe forward, padded batch of two) instead of the first training step failing,
    and leaves the model as it was."""
    from prompt_kernels.testing.tiny_models import build_tiny

    model = build_tiny(model_type, mapping)
    config, impl = model.config, model.config._attn_implementation
    with pytest.raises(ValueError, match=r"sequence-style prompts \(GPC\) do not run on"):
        pk.attach(model, pk.GPCConfig(prompt_length=2))
    assert model.config is config and model.config._attn_implementation == impl
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
