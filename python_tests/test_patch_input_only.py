"""Models no route reaches the layers of (their own attention code and no key/value cache, or no
attention at all): input-style methods still run, with the prompts in front of the input embeddings;
methods that prompt the layers are refused by name."""

from __future__ import annotations

import pytest
import torch
from patch_helpers import assert_generate_equals_recompute, greedy_logits, one_thread  # noqa: F401

import prompt_kernels as pk
from prompt_kernels.testing.tiny_models import build_tiny, tiny_inputs

CASES = [
    ("mamba", "causal-lm"),  # state-space layers, no attention
    ("xlnet", "seq-cls"),  # runs sequence-first: looks its ids up as [T, B]
    ("deberta", "seq-cls"),  # relative-position attention in its own code
]


def _reference(model, inputs, prompt, p):
    """The bare model given the prompt vectors in front of its own token embeddings: the 2D mask and
    token types get ``p`` entries in front, the tokens keep positions 0..T-1 (prompt rows get 0)."""
    ids = inputs["input_ids"]
    B, T = ids.shape
    embeds = model.get_input_embeddings()(ids)
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids",)}
    kwargs["inputs_embeds"] = torch.cat([prompt[None].expand(B, -1, -1), embeds], dim=1)
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = torch.cat(
            [torch.ones(B, p, dtype=kwargs["attention_mask"].dtype), kwargs["attention_mask"]], 1
        )
    if "token_type_ids" in kwargs:
        kwargs["token_type_ids"] = torch.cat(
            [torch.zeros(B, p, dtype=torch.long), kwargs["token_type_ids"]], 1
        )
    if "position_ids" in __import__("inspect").signature(model.forward).parameters:
        kwargs["position_ids"] = torch.cat(
            [torch.zeros(B, p, dtype=torch.long), torch.arange(T).expand(B, -1)], 1
        )
    labels = kwargs.pop("labels", None)
    out = model(**kwargs)
    return out.logits, labels


@pytest.mark.parametrize("model_type,mapping", CASES)
def test_input_style_prompts_on_a_model_whose_layers_take_none(model_type, mapping):
    model = build_tiny(model_type, mapping).eval()
    inputs = tiny_inputs(model, mapping, batch=3, length=5, padding="right", seed=3)
    inputs.pop("labels", None)
    p = 4
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=p))
    assert pm.info.layout.kind == "input" and pm.info.num_layers == 0
    with torch.no_grad():
        pm.method.prompt.normal_()
    out = pm(**inputs).logits
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grad = pm.method.prompt.grad.clone()
    prompt = pm.method.prompt.detach().clone().requires_grad_(True)
    model = pm.detach()
    ref, _ = _reference(model, inputs, prompt, p)  # logits of the prompt rows too, as the model returns them
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    assert prompt.grad.abs().sum() > 0
    torch.testing.assert_close(grad, prompt.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        pk.PrefixTuningConfig(prompt_length=3),
        pk.SPTConfig(prompt_length=3),
        pk.GPCConfig(prompt_length=3),
        pk.HiPromptConfig(prompt_length=3),
    ],
    ids=lambda c: type(c).__name__,
)
def test_methods_that_prompt_the_layers_are_refused_by_name(config):
    model = build_tiny("deberta", "seq-cls")
    before = (model.config, model.config._attn_implementation, [p.requires_grad for p in model.parameters()])
    with pytest.raises(
        ValueError,
        match=rf"{type(config).__name__} puts prompts into the model's layers.*DebertaForSequenceClassification.*prompt tuning",
    ):
        pk.attach(model, config)
    assert (
        model.config,
        model.config._attn_implementation,
        [p.requires_grad for p in model.parameters()],
    ) == before
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))  # nothing was left attached
    pm.detach()


@pytest.mark.parametrize("model_type", ["mamba", "openai-gpt"])
def test_generate_with_input_style_prompts_equals_recomputing_every_step(model_type):
    """Greedy generate with prompt tuning on a model whose layers take no prompts: each step's logits equal
    a full forward of the prompted model over everything so far (and differ from the plain model's)."""
    model = build_tiny(model_type, "causal-lm").eval()
    ids = tiny_inputs(model, "causal-lm", batch=1, length=5, seed=4)["input_ids"]
    plain = greedy_logits(model, ids, 3)
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    with torch.no_grad():
        pm.method.prompt.normal_().mul_(3)
    got = assert_generate_equals_recompute(pm, ids, 3)
    assert not torch.allclose(got, plain, atol=1e-3)
    pm.detach()


def test_a_per_token_argument_prompts_cannot_fill_is_refused_by_name():
    model = build_tiny("xlm", "causal-lm")
    inputs = tiny_inputs(model, "causal-lm", batch=2, length=5)
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    pm(**inputs)  # without langs: runs
    langs = torch.zeros_like(inputs["input_ids"])
    with pytest.raises(
        NotImplementedError, match=r"per-token argument 'langs' \[2, 5\].*call without 'langs'"
    ):
        pm(**inputs, langs=langs)
    pm.detach()
    model = build_tiny("xlnet", "causal-lm")
    pm = pk.attach(model, pk.PromptTuningConfig(prompt_length=3))
    with pytest.raises(
        NotImplementedError, match=r"'perm_mask'.*generate\(\) with input-style prompts is not supported"
    ):
        pm.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    pm.detach()
