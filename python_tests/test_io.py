"""Saved prompts (``patch/io.py``): the base-model check ignores dtype, says what differs, and unreadable
files raise ValueError naming the file. Also prompt tuning's ``init_token_ids`` range check."""

from __future__ import annotations

import json

import pytest
import torch
from patch_helpers import VOCAB, batch, main_output, one_thread, tiny_model  # noqa: F401  (one_thread: autouse)

import prompt_kernels as pk


def _trained(model, cfg):
    """``model`` with ``cfg`` attached and the prompts moved away from their initial values."""
    pm = pk.attach(model, cfg)
    with torch.no_grad():
        for p in pm.prompt_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return pm.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "cfg", [pk.PrefixTuningConfig(prompt_length=3), pk.PromptTuningConfig(prompt_length=3)], ids=str
)
def test_fp32_prompts_load_onto_a_half_precision_copy(tmp_path, dtype, cfg):
    ids, mask = batch("bert")
    pm = _trained(tiny_model("bert", "cls", seed=4, dropout=False), cfg)
    with torch.no_grad():
        ref = main_output(pm(input_ids=ids, attention_mask=mask)).float()
    pm.save_prompts(tmp_path)
    half = tiny_model("bert", "cls", seed=4, dropout=False).to(dtype)
    loaded = pk.load_prompts(half, tmp_path).eval()
    with torch.no_grad():
        got = main_output(loaded(input_ids=ids, attention_mask=mask)).float()
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    # and back: prompts saved from the half-precision model load onto the fp32 one
    loaded.save_prompts(tmp_path / "half")
    pk.load_prompts(tiny_model("bert", "cls", seed=4, dropout=False), tmp_path / "half").detach()


def test_a_different_initialisation_is_refused_naming_the_weights(tmp_path):
    pm = _trained(tiny_model("bert", "cls", seed=1), pk.PrefixTuningConfig(prompt_length=2))
    pm.save_prompts(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        other = tiny_model("bert", "cls", seed=2).to(dtype)
        with pytest.raises(ValueError, match=r"different base model") as err:
            pk.load_prompts(other, tmp_path)
        msg = str(err.value)
        assert "backbone_weights" in msg and "embeddings.word_embeddings.weight" in msg, msg
        assert "relative difference" in msg, msg
        assert all(p.requires_grad for p in other.parameters())  # the refused model is left as it was
    # dimensions and classes are named too
    with pytest.raises(ValueError, match=r"num_layers: saved 2, model 3"):
        pk.load_prompts(tiny_model("bert", "cls", seed=1, num_hidden_layers=3), tmp_path)
    with pytest.raises(ValueError, match=r"model_type: saved 'bert', model 'llama'"):
        pk.load_prompts(tiny_model("llama", "cls", seed=1), tmp_path)


def test_a_slightly_different_model_is_refused(tmp_path):
    """One weight changed by 5% (well above bf16 rounding) in a sampled tensor is a different model."""
    pm = _trained(tiny_model("bert", "base", seed=1), pk.PromptTuningConfig(prompt_length=2))
    pm.save_prompts(tmp_path)
    other = tiny_model("bert", "base", seed=1)
    with torch.no_grad():
        other.embeddings.word_embeddings.weight.mul_(1.05)
    with pytest.raises(ValueError, match=r"backbone_weights.*embeddings\.word_embeddings\.weight"):
        pk.load_prompts(other, tmp_path)


def test_fingerprint_ignores_dtype():
    from prompt_kernels.patch.io import fingerprint

    fps = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pm = pk.attach(tiny_model("llama", "lm", seed=3).to(dtype), pk.PrefixTuningConfig(prompt_length=2))
        fps.append(fingerprint(pm.model, pm.info))
        pm.detach()
    json.dumps(fps)  # stored in config.json
    assert fps[0]["backbone_weights"]["tensors"], fps[0]
    from prompt_kernels.patch.io import compare_fingerprints

    for fp in fps[1:]:
        assert compare_fingerprints(fps[0], fp, head_saved=True) == ([], False)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated (an interrupted copy)
        lambda b: b"not a safetensors file at all",
        lambda b: b"",
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_corrupted_prompts_file_raises_value_error_naming_it(tmp_path, damage):
    pm = _trained(tiny_model("bert", seed=1), pk.PrefixTuningConfig(prompt_length=2))
    pm.save_prompts(tmp_path)
    path = tmp_path / "prompts.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    model = tiny_model("bert", seed=1)
    with pytest.raises(ValueError, match=r"prompts\.safetensors") as err:
        pk.load_prompts(model, tmp_path)
    assert str(tmp_path) in str(err.value)
    assert all(p.requires_grad for p in model.parameters())


def test_corrupted_config_raises_value_error_naming_it(tmp_path):
    pm = _trained(tiny_model("bert", seed=1), pk.PrefixTuningConfig(prompt_length=2))
    pm.save_prompts(tmp_path)
    (tmp_path / "config.json").write_text('{"format": 1, "prompt_config": {')
    with pytest.raises(ValueError, match=r"config\.json"):
        pk.load_prompts(tiny_model("bert", seed=1), tmp_path)


def test_prompts_missing_from_the_file_raise_value_error(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = _trained(tiny_model("bert", seed=1), pk.PrefixTuningConfig(prompt_length=2))
    pm.save_prompts(tmp_path)
    path = tmp_path / "prompts.safetensors"
    tensors = load_file(path)
    save_file({k: v[:1] for k, v in tensors.items()}, path, metadata={"format": "1"})  # wrong shapes
    with pytest.raises(ValueError, match=r"prompts\.safetensors"):
        pk.load_prompts(tiny_model("bert", seed=1), tmp_path)


@pytest.mark.parametrize("init", ["text", "random", "vocab"])
def test_init_token_ids_outside_the_vocabulary(init):
    cfg = pk.PromptTuningConfig(prompt_length=2, init=init, init_token_ids=[5, VOCAB + 3])
    model = tiny_model("bert", seed=1)
    with pytest.raises(ValueError, match=rf"init_token_ids.*{VOCAB + 3}.*vocabulary size {VOCAB}"):
        pk.attach(model, cfg)
    assert all(p.requires_grad for p in model.parameters())  # nothing left attached
    pk.attach(model, pk.PromptTuningConfig(prompt_length=2, init="text", init_token_ids=[VOCAB - 1])).detach()
