"""Encoder-decoder models (T5, BART): prompts in the encoder's and the decoder's self-attention.

P-tuning v2 trains on a toy copy task (loss goes down), ``generate`` works and uses the prompts
(encoder sites included: the encoder's output changes with them), cross-attention takes none, and
prompt tuning puts its vectors in front of the encoder's input (the decoder's cross-attention mask
follows, in ``generate`` too).
"""

from __future__ import annotations

import pytest
import torch
from patch_helpers import one_thread  # noqa: F401  (autouse fixture)

import prompt_kernels as pk
from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

MODELS = ("t5", "bart")


def _encoder_output(model, inputs):
    with torch.no_grad():
        return model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]


@pytest.mark.parametrize("model_type", MODELS)
def test_layout_has_encoder_then_decoder_sites_and_no_cross_attention(model_type):
    model = build_tiny(model_type, "seq2seq")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    stacks = [s.stack for s in pm.info.sites]
    assert stacks == ["encoder"] * 2 + ["decoder"] * 2
    assert [s.causal for s in pm.info.sites] == [False, False, True, True]
    assert len(pm.info.layout.unprompted) == 2  # the decoder's cross-attention modules
    assert all(not any(m is s.module for s in pm.info.sites) for m in pm.info.layout.unprompted)


@pytest.mark.parametrize("model_type", MODELS)
def test_prompts_reach_the_encoder(model_type):
    model = build_tiny(model_type, "seq2seq")
    inputs = tiny_inputs(model, "seq2seq")
    bare = _encoder_output(model, inputs)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    with torch.no_grad():
        out = pm(**inputs, output_hidden_states=True)
    prompted = out.encoder_last_hidden_state
    assert prompted.shape == bare.shape
    assert (prompted - bare).abs().max() > 1e-3
    # Run by itself (as generate does), the encoder is prompted the same way.
    torch.testing.assert_close(_encoder_output(model, inputs), prompted, rtol=1e-5, atol=1e-6)
    pm.detach()
    torch.testing.assert_close(_encoder_output(model, inputs), bare, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", MODELS)
def test_prefix_tuning_trains_on_a_toy_task_and_generates(model_type):
    torch.manual_seed(0)
    model = build_tiny(model_type, "seq2seq")
    inputs = tiny_inputs(model, "seq2seq", batch=4, length=6)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=4))

    def eval_loss():
        pm.eval()
        with torch.no_grad():
            return float(pm(**inputs).loss)

    before = eval_loss()
    pm.train()
    opt = torch.optim.AdamW(pm.prompt_parameters(), lr=0.3)
    for _ in range(40):
        loss = pm(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # A tiny random BART (weights of std 0.02) reacts weakly to prompts: its loss falls by ~10 % here.
    assert after < 0.95 * before, (before, after)
    pm.eval()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        generated = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        bare = pm.detach().generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 4 and generated.shape[1] >= 2
    assert not torch.equal(generated, bare)  # the trained prompts change what is generated


def _greedy(pm, inputs, **kwargs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        return pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **kwargs)


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize(
    "config", [pk.PrefixTuningConfig(prompt_length=3), pk.PromptTuningConfig(prompt_length=3)]
)
def test_generate_with_cache_equals_generate_without(model_type, config):
    """With the cache, the prompts are computed once and the encoder runs once (its mask extended for
    input-style rows); without it every step reruns everything: both must pick the same tokens."""
    model = build_tiny(model_type, "seq2seq")
    inputs = tiny_inputs(model, "seq2seq", batch=2, length=6)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init's, so greedy choices are not ties
            p.mul_(1 + 20 * (p.dim() > 1))
    bare = _greedy(model, inputs)
    pm = pk.attach(model, config)
    pm.eval()
    cached = _greedy(pm, inputs)
    uncached = _greedy(pm, inputs, use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    assert not torch.equal(cached, bare)


@pytest.mark.parametrize("model_type", MODELS)
def test_prompt_tuning_prefixes_the_encoder_input(model_type):
    model = build_tiny(model_type, "seq2seq")
    inputs = tiny_inputs(model, "seq2seq", batch=2, length=6)
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    pm.eval()
    with torch.no_grad():
        out = pm(**inputs)
    assert out.encoder_last_hidden_state.shape[1] == 3 + inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == inputs["labels"].shape[1]  # the decoder's labels are not padded


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize(
    "config",
    [pk.SPTConfig(prompt_length=3, dropout=0.0), pk.InfoPromptConfig(prompt_length=3, head="label_words")],
    ids=["spt", "infoprompt"],
)
def test_input_dependent_methods_train_and_generate(model_type, config):
    """SPT (per-layer generators; each stack carries its own chain of prompts, the decoder's from the
    decoder tokens) and InfoPrompt (representation loss on the encoder's output): a training step with
    their auxiliary losses reaches every prompt parameter, and generate uses the prompts."""
    # Seeded: with the weights scaled up, InfoPrompt's clamped critic (clamp 2) saturates for some dropout
    # masks of the training step (about 1 in 20), and a saturated critic gives its context no gradient.
    torch.manual_seed(0)
    model = build_tiny(model_type, "seq2seq")
    inputs = tiny_inputs(model, "seq2seq", batch=2, length=6)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 20 * (p.dim() > 1))
    bare = _greedy(model, inputs)
    pm = pk.attach(model, config)
    pm.train()
    if isinstance(config, pk.InfoPromptConfig):
        pm.method.set_label_token_ids([[5], [7, 8]])  # a generator's classes are label words
        pm.method.set_labels(torch.tensor([0, 1]))
    out = pm(**inputs)
    want = {"spt_consistency"} if isinstance(config, pk.SPTConfig) else {"infoprompt_head", "infoprompt_rep"}
    assert want <= set(pm.last_aux_losses) and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [
        n for n, p in pm.method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing, missing
    pm.eval()
    assert not torch.equal(_greedy(pm, inputs), bare)


@pytest.mark.parametrize("model_type", ["bart", "t5gemma2"])
def test_input_dependent_methods_on_encoder_decoder_classifiers(model_type, monkeypatch):
    """Sequence classification with an encoder-decoder: the class labels ``[B]`` are no decoder input, so
    the methods' nested forwards (SPT's consistency run, InfoPrompt's unprompted run) let the model build
    the decoder input from ``input_ids`` as the call itself does (they used to shift the class labels
    into a 1D decoder input and crash inside the model)."""
    from prompt_kernels.patch.context import ForwardContext

    model = build_tiny(model_type, "seq-cls")
    inputs = tiny_inputs(model, "seq-cls", batch=2, length=6)
    assert inputs["labels"].dim() == 1 and "decoder_input_ids" not in inputs
    seen = []
    original = ForwardContext.kwargs_without_labels
    monkeypatch.setattr(
        ForwardContext, "kwargs_without_labels", lambda self: seen.append(original(self)) or seen[-1]
    )
    rows = model.get_input_embeddings().weight[:2].detach()
    for config in (pk.SPTConfig(prompt_length=3, dropout=0.0), pk.InfoPromptConfig(prompt_length=3)):
        options = (
            {"label_embeddings": rows}
            if model_type == "bart" and isinstance(config, pk.InfoPromptConfig)
            else {}
        )
        pm = pk.attach(model, config, **options)
        pm.train()
        if isinstance(config, pk.InfoPromptConfig):
            pm.method.set_labels(inputs["labels"])
        out = pm(**inputs)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        missing = [
            n
            for n, p in pm.method.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())
        ]
        assert not missing, (type(config).__name__, missing)
        pm.detach()
    assert seen and all(k["labels"] is None and k.get("decoder_input_ids") is None for k in seen)
