"""Several named prompt sets on one frozen model, chosen per batch row: each row's output equals the
row run alone with its own set (serving many prompt-tuned tasks from one base model)."""

from __future__ import annotations

import pytest
import torch
from patch_helpers import batch, main_output, one_thread, tiny_model  # noqa: F401  (autouse fixture)

import prompt_kernels as pk


def _randomise(method):
    with torch.no_grad():
        for p in method.parameters():
            p.normal_()


@pytest.mark.parametrize("model_type,head", [("llama", "lm"), ("bert", "cls")])
@pytest.mark.parametrize(
    "config",
    [
        pk.PrefixTuningConfig(prompt_length=3),
        pk.PromptTuningConfig(prompt_length=3),
        pk.HiPromptConfig(prompt_length=3),
    ],
    ids=["prefix", "prompt", "hiprompt"],
)
def test_rows_use_their_own_prompt_set(model_type, head, config, tmp_path):
    model = tiny_model(model_type, head, dropout=False)
    ids, mask = batch(model_type, B=3)
    pm = pk.attach(model, config)
    pm.eval()
    _randomise(pm.method)
    other = pm.add_prompt_set("other", config)
    _randomise(other)
    pm.save_prompts(tmp_path / "default")
    loaded = pm.add_prompt_set("loaded", tmp_path / "default")  # the default set's prompts, from disk
    sets = ["other", "default", "loaded"]
    with torch.no_grad():
        mixed = main_output(pm(input_ids=ids, attention_mask=mask, prompt_set=sets))
        for i, name in enumerate(sets):
            alone = main_output(pm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], prompt_set=name))
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        default = main_output(pm(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(mixed[1:], default[1:], rtol=1e-5, atol=1e-5)  # "loaded" equals "default"
    assert (mixed[0] - default[0]).abs().max() > 1e-4  # "other" differs
    assert set(pm.state_dict()) >= {f"prompt_sets.other.{k}" for k in other.state_dict()}
    assert loaded is pm.prompt_sets["loaded"]


def test_prompt_set_gradients_reach_only_the_rows_set():
    model = tiny_model("llama", "lm", dropout=False)
    ids, mask = batch("llama", B=2)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=2))
    other = pm.add_prompt_set("other", pk.PrefixTuningConfig(prompt_length=2))
    out = pm(input_ids=ids, attention_mask=mask, labels=ids, prompt_set=["other", "other"])
    out.loss.backward()
    assert other.embedding.weight.grad.abs().sum() > 0
    assert pm.method.embedding.weight.grad is None


def test_bad_prompt_sets_are_refused():
    model = tiny_model("llama", "lm")
    ids, mask = batch("llama", B=2)
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=2))
    with pytest.raises(ValueError, match="prompt_length=2"):
        pm.add_prompt_set("x", pk.PrefixTuningConfig(prompt_length=3))
    with pytest.raises(ValueError, match="PrefixTuningConfig"):
        pm.add_prompt_set("x", pk.PromptTuningConfig(prompt_length=2))
    with pytest.raises(ValueError, match="new prompt set name"):
        pm.add_prompt_set("default", pk.PrefixTuningConfig(prompt_length=2))
    with pytest.raises(ValueError, match="unknown prompt sets"):
        pm(input_ids=ids, attention_mask=mask, prompt_set=["default", "nope"])
    with pytest.raises(ValueError, match="one per batch row"):
        pm(input_ids=ids, attention_mask=mask, prompt_set=["default"])


def test_a_prompt_set_with_its_own_head_is_refused(tmp_path):
    """All rows share the model's one head: a set that trained its own (fresh config or saved run) would
    lose it silently, so it is refused, naming the set."""
    trained = pk.attach(
        tiny_model("bert", "cls"), pk.PrefixTuningConfig(prompt_length=2, trainable_head=True)
    )
    trained.save_pretrained(tmp_path)
    pm = pk.attach(tiny_model("bert", "cls"), pk.PrefixTuningConfig(prompt_length=2))
    with pytest.raises(ValueError, match="'saved' has its own trained head"):
        pm.add_prompt_set("saved", tmp_path)
    with pytest.raises(ValueError, match="'fresh' has its own trained head"):
        pm.add_prompt_set("fresh", pk.PrefixTuningConfig(prompt_length=2, trainable_head=True))
    assert not pm.prompt_sets
    pm.add_prompt_set("prompts_only", pk.PrefixTuningConfig(prompt_length=2))
    assert list(pm.prompt_sets) == ["prompts_only"]
