"""``torch.compile`` of a whole prompted model: one graph (no break per layer, no recompilation per
layer), ``fullgraph=True`` for every method on a causal and an encoder model, the same loss and prompt
gradients as eager. SPT's search step with the consistency loss is the exception (it saves and
restores the RNG state around its second forward, which Dynamo does not trace): it compiles with graph
breaks there and still equals eager.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from patch_helpers import batch, one_thread, tiny_model  # noqa: F401  (autouse fixture)
from torch._dynamo.testing import CompileCounterWithBackend

import prompt_kernels as pk


def configs():
    # Method-internal dropout off: eager and compiled runs must see the same function.
    return {
        "prompt_tuning": pk.PromptTuningConfig(prompt_length=3),
        "prefix_tuning": pk.PrefixTuningConfig(prompt_length=3),
        "spt": pk.SPTConfig(prompt_length=3, dropout=0.0, consistency_weight=0.0),
        "vip": pk.VIPConfig(prompt_length=3, contextualizer_dropout=0.0),
        "infoprompt": pk.InfoPromptConfig(prompt_length=3),
        "gpc": pk.GPCConfig(prompt_length=3),
        "hiprompt": pk.HiPromptConfig(prompt_length=3),
    }


METHODS = tuple(configs())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompted(model_type: str, config, seed: int = 0):
    model = tiny_model(model_type, head="cls", dropout=False)
    # transformers' classification loss sets config.problem_type on its first call, which would
    # recompile the second call of the bare model too: set it up front.
    model.config.problem_type = "single_label_classification"
    torch.manual_seed(seed)
    return pk.attach(model, config)


def _step(fn, pm, ids, mask, labels, seed: int = 3):
    """Loss and prompt gradients of one training forward + backward (prompt grads cleared first)."""
    params = list(pm.method.prompt_parameters())
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    out = fn(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in params if p.grad is not None], out.logits.detach()


def _assert_same(eager, compiled):
    (l0, g0, y0), (l1, g1, y1) = eager, compiled
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert len(g1) == len(g0) and g0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_whole_model_compiles_as_one_graph(method, model_type):
    """fullgraph=True in training and eval; two training calls compile one frame (no recompilation);
    loss, logits and prompt gradients equal eager."""
    ids, mask = batch(model_type)
    labels = torch.tensor([0, 2, 1])
    eager_pm = _prompted(model_type, configs()[method]).train()
    pm = _prompted(model_type, configs()[method]).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pm, backend=counter, fullgraph=True)

    want = _step(eager_pm, eager_pm, ids, mask, labels)
    got = _step(compiled, pm, ids, mask, labels)
    _assert_same(want, got)
    _assert_same(_step(eager_pm, eager_pm, ids, mask, labels, 4), _step(compiled, pm, ids, mask, labels, 4))
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames for one model"

    pm.eval()
    eager_pm.eval()
    with torch.no_grad():
        y = compiled(input_ids=ids, attention_mask=mask).logits
        y_ref = eager_pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_explain_finds_no_graph_break_on_a_padded_causal_batch():
    """The per-layer break the mask conversion used to cause (a data-dependent check per layer)."""
    pm = _prompted("llama", pk.PrefixTuningConfig(prompt_length=4)).eval()
    ids, mask = batch("llama", pad_last=3)
    explained = torch._dynamo.explain(pm)(input_ids=ids, attention_mask=mask)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_spt_search_with_consistency_compiles_and_equals_eager():
    """SPT's search step with its consistency loss: graph breaks around the RNG replay (fullgraph=True is
    not supported there), same loss and gradients (gates included) as eager."""
    config = pk.SPTConfig(prompt_length=3, dropout=0.0, consistency_weight=1.0)
    ids, mask = batch("bert")
    labels = torch.tensor([0, 2, 1])
    eager_pm = _prompted("bert", config).train()
    pm = _prompted("bert", config).train()
    compiled = torch.compile(pm, backend="aot_eager")
    want = _step(eager_pm, eager_pm, ids, mask, labels)
    got = _step(compiled, pm, ids, mask, labels)
    assert "spt_consistency" in pm.last_aux_losses
    _assert_same(want, got)


def test_inductor_training_step_equals_eager():
    """The real compiler (inductor, C++ on CPU): prefix tuning on a causal model, loss and gradients."""
    ids, mask = batch("llama")
    labels = torch.tensor([1, 0, 2])
    config = pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0)  # inductor draws its own randoms
    eager_pm = _prompted("llama", config).train()
    pm = _prompted("llama", config).train()
    compiled = torch.compile(pm, fullgraph=True)
    want = _step(eager_pm, eager_pm, ids, mask, labels)
    got = _step(compiled, pm, ids, mask, labels)
    l0, g0, y0 = want
    l1, g1, y1 = got
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_dynamic_shapes_and_prompt_sets(model_type):
    """Batches of many lengths and sizes compile a few frames (dynamic shapes), not one per shape; a
    batch whose rows use different prompt sets compiles with symbolic sizes too and equals eager."""
    pm = _prompted(model_type, pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0)).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pm, backend=counter, fullgraph=True)
    for T in (5, 7, 9, 11):
        for B in (2, 3):
            ids, mask = batch(model_type, B=B, T=T)
            compiled(
                input_ids=ids, attention_mask=mask, labels=torch.zeros(B, dtype=torch.long)
            ).loss.backward()
    assert counter.frame_count <= 3, counter.frame_count
    pm.add_prompt_set("other", pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0))
    ids, mask = batch(model_type, B=3, T=6)
    rows = ["default", "other", "default"]
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask, prompt_set=rows).logits
        want = pm(input_ids=ids, attention_mask=mask, prompt_set=rows).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_trainer_with_torch_compile_trains_and_checkpoints_prompts_only(tmp_path):
    """``TrainingArguments(torch_compile=True)``, what a Trainer user sets: training and evaluation run
    through the compiled PromptedModel, eval_loss is reported and the checkpoint holds the prompts only."""
    from safetensors.torch import load_file
    from test_patch_trainer import _trainer

    pm = _prompted("bert", pk.PrefixTuningConfig(prompt_length=3))
    before = pm.method.embedding.weight.detach().clone()
    trainer = _trainer(pm, tmp_path, [], torch_compile=True, torch_compile_backend="aot_eager")
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    assert not torch.equal(pm.method.embedding.weight, before)
    saved = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    assert set(saved) == {"method.embedding.weight"}
