"""The tiny-model zoo (``prompt_kernels.testing.tiny_models``): every model type of the installed
transformers' causal-LM, sequence-classification and seq2seq auto mappings, shrunk to 2 layers.

The whole zoo is built (and each model's bare forward + backward checked) once per session, on one
thread: about 15 s of CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from prompt_kernels.testing import tiny_models as tm

# Tiny models that run, per mapping, at least (transformers 5.25: 193, 125, 37 of 200, 127, 38).
FLOORS = {"causal-lm": 185, "seq-cls": 120, "seq2seq": 35}
KNOWN = [
    *[("causal-lm", t) for t in ("llama", "gpt2", "mistral", "gemma2", "qwen3_moe", "deepseek_v3", "jamba")],
    *[("causal-lm", t) for t in ("bert", "bart", "qwen3_next")],
    *[("seq-cls", t) for t in ("bert", "llama", "bart", "t5")],
    *[("seq2seq", t) for t in ("t5", "bart")],
]
# Layer counts above 2 by construction: HRM cycles its 2-layer stacks (16 virtual layers), Funnel
# has one layer in each of its 3 blocks, LongCat-Flash counts 2 sub-layers per layer.
MORE_LAYERS = {"hrm_text", "funnel", "longcat_flash"}


@pytest.fixture(scope="session")
def zoo() -> dict[str, dict[str, object]]:
    """mapping -> model type -> tiny model, or the reason it has none."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {mapping: dict(tm.iter_tiny(mapping)) for mapping in tm.MAPPINGS}
    finally:
        torch.set_num_threads(n)


def _built(zoo):
    return [(mp, mt, m) for mp, models in zoo.items() for mt, m in models.items() if not isinstance(m, str)]


def _kinds(config) -> list[str] | None:
    for name in tm._LAYER_KINDS:
        try:
            kinds = getattr(config, name)
        except Exception:
            continue
        if isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
            return list(kinds)
    return None


def test_every_model_type_is_in_the_zoo(zoo):
    for mapping in tm.MAPPINGS:
        assert list(zoo[mapping]) == tm.model_types(mapping)


@pytest.mark.parametrize("mapping", tm.MAPPINGS)
def test_counts_reach_the_floor(zoo, mapping):
    built = [mt for mt, m in zoo[mapping].items() if not isinstance(m, str)]
    assert len(built) >= FLOORS[mapping], {mt: r for mt, r in zoo[mapping].items() if isinstance(r, str)}


def test_every_failure_has_a_reason(zoo):
    for mapping, models in zoo.items():
        for model_type, m in models.items():
            if isinstance(m, str):
                assert m.strip(), (mapping, model_type)
                assert m.split(":")[0] in ("config", "build", "run"), (mapping, model_type, m)


@pytest.mark.parametrize("mapping,model_type", KNOWN)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_known_architectures_build_and_run(zoo, mapping, model_type, padding):
    model = zoo[mapping][model_type]
    assert isinstance(model, torch.nn.Module), model
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation in ("sdpa", "eager")
    tm.bare_check(model, tm.tiny_inputs(model, mapping, padding=padding, seed=1))
    assert all(p.grad is None for p in model.parameters())


def test_models_are_tiny(zoo):
    for mapping, model_type, model in _built(zoo):
        text = tm.text_config(model.config)
        layers = getattr(text, "num_hidden_layers", None)
        if model_type not in MORE_LAYERS and isinstance(layers, int):
            assert layers <= tm.LAYERS, (mapping, model_type, layers)
        assert sum(p.numel() for p in model.parameters()) < 8_000_000, (mapping, model_type)
        vocab = getattr(text, "vocab_size", None)
        assert vocab is None or vocab <= tm.VOCAB, (mapping, model_type)
        for key in dir(text):
            if key.endswith("_token_id") and isinstance(getattr(text, key, None), int) and vocab:
                assert getattr(text, key) < vocab, (mapping, model_type, key)
        window = getattr(text, "sliding_window", None)
        assert not isinstance(window, int) or window <= 8, (mapping, model_type, window)


def test_shrinking_keeps_a_full_attention_layer_and_the_hybrid_kinds(zoo):
    """Where the default config has a full-attention layer, the tiny one has one; where it mixes
    layer kinds (sliding / full, mamba / attention, ...), the tiny one keeps two kinds."""
    for mapping, model_type, model in _built(zoo):
        if model_type == "zamba":  # two hybrid (mamba + shared attention) layers, see _OVERRIDES
            continue
        default = _kinds(tm.text_config(AutoConfig.for_model(model_type)))
        tiny = _kinds(tm.text_config(model.config))
        if not default:
            continue
        if any(tm._is_full_attention(k) for k in default):
            assert any(tm._is_full_attention(k) for k in tiny), (mapping, model_type, tiny)
        if len(set(default)) > 1:
            assert len(set(tiny)) == 2, (mapping, model_type, tiny)


def test_hybrids_keep_one_attention_and_one_other_layer(zoo):
    jamba = zoo["causal-lm"]["jamba"].config
    assert jamba.layers_block_type == ["mamba", "attention"]
    gemma2 = zoo["causal-lm"]["gemma2"].config
    assert gemma2.layer_types == ["sliding_attention", "full_attention"] and gemma2.sliding_window == 8
    deepseek = zoo["causal-lm"]["deepseek_v3"].config
    assert deepseek.n_routed_experts == 4 and deepseek.num_experts_per_tok == 2
    assert deepseek.num_key_value_heads == deepseek.num_attention_heads  # MLA: a key/value per head
    llama = zoo["causal-lm"]["llama"].config
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads) == (64, 4, 2)


@pytest.mark.parametrize(
    "mapping,model_type", [("causal-lm", "llama"), ("seq-cls", "bert"), ("seq2seq", "t5")]
)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_tiny_inputs(zoo, mapping, model_type, padding):
    model = zoo[mapping][model_type]
    inputs = tm.tiny_inputs(model, mapping, batch=3, length=6, padding=padding, seed=3)
    again = tm.tiny_inputs(model, mapping, batch=3, length=6, padding=padding, seed=3)
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (3, 6)
    assert mask[:2].all() and mask[2].sum() == 4
    assert (mask[2, :2] == 0).all() if padding == "left" else (mask[2, -2:] == 0).all()
    pad = tm.text_config(model.config).pad_token_id
    assert (ids[mask == 0] == (pad if isinstance(pad, int) else 0)).all()
    labels = inputs["labels"]
    if mapping == "causal-lm":
        assert torch.equal(labels, ids.masked_fill(mask == 0, -100))
        assert not set(ids[mask == 1].tolist()) & tm._special_ids(model.config)
    elif mapping == "seq-cls":
        assert labels.shape == (3,) and labels.max() < model.config.num_labels
    else:
        assert labels.shape == (3, 4) and labels[2, -1] == -100
        last = mask.cumsum(1).argmax(1)  # encoder inputs end with eos, as T5's tokenizer makes them
        assert (ids[torch.arange(3), last] == model.config.eos_token_id).all()
    if mapping == "seq-cls":  # BERT's forward takes token type ids
        assert torch.equal(inputs["token_type_ids"], torch.zeros_like(ids))


def test_bare_check_reports_failures(zoo):
    model = zoo["causal-lm"]["llama"]
    inputs = tm.tiny_inputs(model, "causal-lm")
    with pytest.raises(tm.TinyModelUnavailable, match="no loss"):
        tm.bare_check(model, {k: v for k, v in inputs.items() if k != "labels"})
    with pytest.raises(tm.TinyModelUnavailable, match=r"^run: "):
        tm.bare_check(model, {**inputs, "input_ids": inputs["input_ids"] + 10_000})


def test_tiny_config_overrides_and_unknown_mapping():
    config = tm.tiny_config("llama", "seq-cls", num_hidden_layers=1)
    assert config.num_hidden_layers == 1 and config.num_labels == 3 and config.pad_token_id is not None
    assert tm.tiny_config("llama", "causal-lm").num_hidden_layers == 2  # the cached shrink is untouched
    with pytest.raises(ValueError, match="mapping"):
        tm.model_types("token-cls")
    with pytest.raises(tm.TinyModelUnavailable, match=r"^config: "):
        tm.tiny_config("no-such-model", "causal-lm")
