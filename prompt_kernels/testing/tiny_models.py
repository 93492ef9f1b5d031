"""Tiny random models of every architecture in the installed transformers' auto mappings.

``tiny_config(model_type, mapping)`` takes the architecture's default config (``AutoConfig.for_model``)
and shrinks it by the names transformers standardises (layer counts, hidden sizes, heads, expert
counts, vocabulary, ...): 2 layers, hidden size 64, 4 heads (2 key/value heads), head_dim 16, MLP 128,
4 experts, vocabulary 512, sliding windows of 8. Per-layer lists (``layer_types``, ...) keep two
layers, one of them a full-attention layer and, in hybrid models, one of another kind. A short table
(``_OVERRIDES``) holds the per-model exceptions where generic shrinking cannot work, each with its
reason. Composite configs (``text_config``, vision / audio sub-configs, ...) have each sub-config
shrunk the same way; heterogeneous configs (``per_layer_config``) keep their per-layer differences,
scaled; multi-head latent attention keeps one key/value head per query head. ``build_tiny`` builds
the model (fp32, eval mode) and checks that the bare model runs a forward with labels and a backward;
every architecture that cannot be built or run raises ``TinyModelUnavailable`` with the reason. The
whole zoo (three mappings, about 360 model types) builds and runs in about 15 s of one CPU thread.
Nothing is downloaded, but run with ``HF_HUB_OFFLINE=1`` (the test-suite does): importing some
modeling files (GPT-Neo's) asks the Hub for flash-attention kernels through the ``kernels`` package.

    >>> for model_type, model in iter_tiny("causal-lm"):
    ...     if isinstance(model, str):
    ...         print(model_type, "unavailable:", model)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import warnings
from collections.abc import Iterator

import torch

MAPPINGS = ("causal-lm", "seq-cls", "seq2seq")
# The auto mappings of transformers.models.auto.modeling_auto (``<name>_NAMES``: model type -> class name).
_MAPPING_NAMES = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING",
    "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
}

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, NUM_LABELS = 2, 64, 4, 2, 16, 128, 512, 3

# Config field -> the most it may be in a tiny model (a smaller default is kept). Only fields a config
# has are set (``_init_names``); attributes it derives in ``__post_init__`` it derives again.
_AT_MOST: dict[str, int] = {
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "encoder_layers",
            "decoder_layers",
            "num_decoder_layers",
            "num_encoder_layers",
            "num_self_attends_per_block",
            "num_blocks",
        ),
        LAYERS,
    ),
    **dict.fromkeys(
        (
            "hidden_size",
            "d_model",
            "n_embd",
            "dim",
            "emb_dim",
            "embedding_size",
            "embedding_dim",
            "d_latents",
        ),
        HIDDEN,
    ),
    # Widths of another (sub-)model that a projection or head reads: that model's hidden size.
    **dict.fromkeys(("audio_hidden_size", "adapter_in_dim", "adapter_out_dim", "adapter_input_size"), HIDDEN),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "num_self_attention_heads",
            "num_cross_attention_heads",
            "swa_num_attention_heads",
        ),
        HEADS,
    ),
    **dict.fromkeys(
        ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "swa_num_key_value_heads"), KV_HEADS
    ),
    **dict.fromkeys(
        ("head_dim", "d_kv", "d_head", "dim_head", "attention_head_size", "rotary_dim", "swa_head_dim"),
        HEAD_DIM,
    ),
    **dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "d_ff",
            "n_inner",
            "d_inner",
            "dff",
            "dim_ff",
            "ffn_hidden_size",
            "intermediate_size_mlp",
            "hidden_dim",
            "mlp_dim",
            "feed_forward_size",
            "dense_intermediate_size",
            "first_dense_intermediate_size",
            "mlp_only_intermediate_size",
        ),
        MLP,
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "shared_intermediate_size",
            "expert_ffn_hidden_size",
        ),
        32,
    ),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    # DeepSeek-style multi-head latent attention.
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": HEAD_DIM,
    # Linear-attention (gated delta net) and indexer dims.
    **dict.fromkeys(
        ("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "index_head_dim"), HEAD_DIM
    ),
    **dict.fromkeys(("linear_num_key_heads", "index_n_heads", "index_num_heads"), 2),
    **dict.fromkeys(("linear_num_value_heads", "linear_num_heads"), HEADS),
    # State-space mixers: d_ssm = heads * head dim = expand (2) * hidden; small states and chunks.
    "mamba_d_ssm": 2 * HIDDEN,
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 8),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim"), HEAD_DIM),
    **dict.fromkeys(("mamba_d_state", "ssm_state_size"), HEAD_DIM),
    **dict.fromkeys(("mamba_chunk_size",), HEAD_DIM),
    "num_latents": 16,
    "num_filters": 4,  # convolutional audio encoders: channels double from it at every stage
    # Layers at the end that reuse an earlier layer's keys/values: none of 2 layers can.
    "num_kv_shared_layers": 0,
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 128),
    # Small enough to bite in short sequences (7 tokens plus a few prompt tokens).
    **dict.fromkeys(
        ("sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len"), 8
    ),
    "local_attention": 16,  # ModernBERT: a window of local_attention / 2 on each side
}

# Per-model exceptions to the generic shrinking, each with its reason.
_QSA = dict(
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=HEAD_DIM,
    indexer_budget=8,
    indexer_compress_ratio=4,
)
_OVERRIDES: dict[str, dict] = {
    # Hybrids whose attention layers are placed by a period/offset or an index list that two layers
    # would miss: layer 0 stays the recurrent/state-space kind, layer 1 becomes attention.
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    # Configs whose defaults leave required fields None (the default model cannot be built).
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "deepseek_v2": dict(num_experts_per_tok=2),
    # The layer counts of the input / looped / output sections must add up to the 2 layers.
    "dory": dict(n_input_layers=0, n_output_layers=1),
    # Mamba2 mixers need num_heads * head_dim == expand * hidden_size, and groups dividing the heads.
    "mamba2": dict(num_heads=8, head_dim=HEAD_DIM, n_groups=1),
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig no longer defines, and
    # clamps q/k/v by attn_config.clip_qkv, None by default.
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # default: all mamba
    # Shared transformer blocks are tied across hybrid layers: two hybrid layers (mamba + attention).
    "zamba": dict(layers_block_type=["hybrid", "hybrid"]),
    # Settings the default config leaves unusable: no vocabulary (ESM-2's is 33 tokens), no language
    # for the X-MOD adapters; BLT cannot build its cache (BltConfig has no num_hidden_layers).
    "esm": dict(vocab_size=33, pad_token_id=1, mask_token_id=32),
    "esmc": dict(num_key_value_heads=HEADS),  # no grouped-query attention
    "xmod": dict(default_language="en_XX"),
    # RWKV's CPU kernel updates the state it returns in place, which breaks the backward when the
    # state is kept as a cache.
    "rwkv": dict(use_cache=False),
    # Embedding sizes tied to hidden_size: LayoutLMv3's 2-D position embeddings are 4 coordinate and
    # 2 shape embeddings (4 * 8 + 2 * 16 = 64); LiLT's are 6 slices of hidden_size // 6 (96 / 6 = 16);
    # Reformer's axial position embeddings add up to hidden_size.
    "layoutlmv3": dict(coordinate_size=8, shape_size=16),
    "lilt": dict(hidden_size=96),
    "reformer": dict(axial_pos_embds_dim=[32, 32]),
    # The assistant's text model must have no per-layer inputs (its default config fails validation).
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)),
    # The local encoder/decoder project to the global transformer's width, hidden_size_global.
    "blt": dict(
        use_cache=False,
        encoder_config=dict(hidden_size_global=HIDDEN),
        decoder_config=dict(hidden_size_global=HIDDEN),
    ),
    # The config rounds the mLSTM's q/k width (hidden * 0.5) up to a multiple of 64, the model not.
    "xlstm": dict(hidden_size=128, embedding_dim=128),
    # Indexed (QSA) attention layers need the indexer sizes its default config leaves None.
    "qwen4_exp_text": _QSA,
    "qwen4_exp": dict(text_config=_QSA),
    # Sliding layers' head_dim must equal their qk_nope + qk_rope head dims (per-layer nope: 1.5x).
    "dots3_note_text": dict(qk_nope_head_dim=16, head_dim=32),
    "dots3_note": dict(text_config=dict(qk_nope_head_dim=16, head_dim=32)),
    # The default rope_parameters are empty, but the rotary embedding reads one per layer type.
    "cohere_compass_text": dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    ),
}

_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
_LAYER_KINDS = ("layer_types", "layers_block_type", "block_types", "attn_layers")


class TinyModelUnavailable(Exception):
    """The architecture has no tiny model here; the message says why."""


def model_types(mapping: str) -> list[str]:
    """Sorted model types of ``mapping`` (one of ``MAPPINGS``) in the installed transformers."""
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, _MAPPING_NAMES[_check_mapping(mapping)] + "_NAMES"))


def _check_mapping(mapping: str) -> str:
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    return mapping


def _is_full_attention(kind) -> bool:
    return isinstance(kind, str) and (
        "full" in kind or "global" in kind or kind in ("attention", "attn", "hybrid")
    )


def _is_attention(kind) -> bool:
    return isinstance(kind, str) and ("attention" in kind or "attn" in kind) and "linear" not in kind


def _kept_layers(lists: dict[str, list], n: int) -> list[int]:
    """The two of ``n`` layers a tiny model keeps, given the config's per-layer lists: a full-attention
    layer (else any attention layer, else the first) and the first layer of another kind (by the
    attention kinds first, then by the other lists), in the original order."""
    if n <= LAYERS:
        return list(range(n))
    kinds = [lst for lst in lists.values() if all(isinstance(v, str) for v in lst)]
    attn = next((lst for name, lst in lists.items() if lst in kinds and "mlp" not in name), None)
    first = 0
    if attn is not None:
        first = next(
            (i for i, v in enumerate(attn) if _is_full_attention(v)),
            next((i for i, v in enumerate(attn) if _is_attention(v)), 0),
        )

    def signature(i):
        return tuple(lst[i] for lst in ([attn] if attn is not None else []) + kinds)

    other = next((i for i in range(n) if attn is not None and attn[i] != attn[first]), None)
    if other is None:
        other = next((i for i in range(n) if signature(i) != signature(first)), None)
    if other is None:
        other = 1 if first == 0 else 0
    return sorted((first, other))


def _is_index_list(value, n: int) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(0 <= v < n for v in value)
        and value == sorted(set(value))
        and (len(value) != n or value == list(range(n)))
    )


def _init_names(cls) -> dict[str, str]:
    """Serialised config key -> the field (``__init__`` keyword) that sets it: the key itself, or the
    field that ``attribute_map`` redirects to it. Keys without one are attributes the config derives
    in ``__post_init__``; they are left for it to derive from the shrunk fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    names = {f: f for f in fields}
    for alias, real in cls.attribute_map.items():
        if alias in fields:
            names.setdefault(real, alias)
    return names


def _shrink_kwargs(cfg, overrides: dict | None = None, given=()) -> dict:
    """Keyword arguments that rebuild ``cfg`` (a config instance) as a tiny config; ``overrides`` (from
    ``_OVERRIDES``) replace the generic choices, a dict under a sub-config's key goes to that one;
    ``given`` names fields the caller set (a sub-config's init kwargs): shrunk even if derived."""
    from transformers import PreTrainedConfig

    overrides = overrides or {}
    raw = cfg.to_dict()
    values = {k: _attribute(cfg, k, raw) for k in raw}
    values.pop("per_layer_config", None)
    subs = {k for k, v in values.items() if isinstance(v, PreTrainedConfig)}
    kwargs = {k: _shrunk_subconfig(cfg, k, values[k], overrides.get(k)) for k in subs}
    names = {**_init_names(type(cfg)), **{k: k for k in given}}
    kwargs.update(_sizes({k: v for k, v in values.items() if k in names}))
    kwargs.update(_layers(values, kwargs))
    kwargs.update({k: v for k, v in overrides.items() if k not in subs})
    if raw.get("per_layer_config"):
        kwargs["per_layer_config"] = _per_layer_config(raw["per_layer_config"], values, kwargs)
    kwargs.update(_token_ids(values, kwargs))
    return {names.get(k, k): v for k, v in kwargs.items()}


def _attribute(cfg, key: str, raw: dict):
    """``cfg.key``; the serialised value where reading it raises (heterogeneous configs refuse global
    reads of attributes that vary per layer)."""
    try:
        return getattr(cfg, key)
    except Exception:
        return raw[key]


def _per_layer_config(per_layer: dict, values: dict, shrunk: dict) -> dict:
    """A heterogeneous config's per-layer overrides for the kept layers, renumbered, sizes scaled."""
    n = _layer_count(values)
    per_layer = {int(k): v for k, v in per_layer.items()}
    keep = _keep(_per_layer_lists(values, n), n)
    out = {}
    for j, i in enumerate(keep):
        overrides = {key: _scaled(key, v, values, shrunk) for key, v in per_layer.get(i, {}).items()}
        if overrides:
            out[j] = overrides
    return out


def _sizes(values: dict) -> dict:
    """The ``_AT_MOST`` sizes of the settable ``values``; a missing head_dim or key/value head count
    set to the tiny one."""
    sizes = {}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key in _AT_MOST and value > _AT_MOST[key]:
            sizes[key] = _AT_MOST[key]
        elif "vocab" in key and value > VOCAB:  # extra vocabularies (entities, hashed n-grams, ...)
            sizes[key] = VOCAB
    for key, value in values.items():  # layers per stage of staged encoders (conv audio, Funnel)
        if (
            key.endswith(("depths", "block_sizes"))
            and isinstance(value, (list, tuple))
            and all(isinstance(v, int) for v in value)
        ):
            sizes[key] = [1] * len(value)
    # Some configs leave these None and their models read them unchecked (hidden / heads = 16).
    for key, tiny in (("head_dim", HEAD_DIM), ("num_key_value_heads", KV_HEADS)):
        if key in values and values[key] is None:
            sizes[key] = tiny
    if (
        isinstance(values.get("qk_rope_head_dim"), int)
        and values.get("head_dim") == values["qk_rope_head_dim"]
    ):
        sizes["head_dim"] = sizes.get("qk_rope_head_dim", values["qk_rope_head_dim"])  # MLA rope dims
    if values.get("kv_lora_rank") is not None and "num_key_value_heads" in values:
        # Multi-head latent attention expands its latent into one key/value per query head.
        sizes["num_key_value_heads"] = sizes.get("num_attention_heads", values.get("num_attention_heads"))
    return sizes


def _is_layer_reference_list(value, n: int) -> bool:
    """A per-layer list naming, for each layer, an earlier (or the same) layer, e.g. the layer whose
    keys/values it reads."""
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= i for i, v in enumerate(value))
        and not set(value) <= {0, 1}
    )


def _per_layer_lists(values: dict, n: int) -> dict[str, list]:
    return {
        k: list(v)
        for k, v in values.items()
        if isinstance(v, (list, tuple)) and len(v) == n and not _is_index_list(v, n)
    }


def _keep(per_layer: dict[str, list], n: int) -> list[int]:
    return _kept_layers({k: v for k, v in per_layer.items() if not _is_layer_reference_list(v, n)}, n)


def _scaled(key: str, value, values: dict, shrunk: dict):
    """A per-layer size scaled like the global one it varies (``num_attention_heads_per_layer`` like
    ``num_attention_heads``): a layer with twice the global size keeps twice the tiny size."""
    name = next((k for k in shrunk if key == k or key.startswith(k + "_")), None)
    old, new = values.get(name), shrunk.get(name)
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and isinstance(old, int)
        and isinstance(new, int)
    ):
        return max(1, round(new * value / old)) if old > 0 else value
    return value


def _layer_count(values: dict) -> int | None:
    """The config's layer count: a count field, else the length of its per-layer kinds list (where
    the count is a property over that list)."""
    count = next((values[k] for k in _LAYER_COUNTS if isinstance(values.get(k), int)), None)
    if count is None:
        kinds = next((values[k] for k in _LAYER_KINDS if isinstance(values.get(k), (list, tuple))), None)
        count = len(kinds) if kinds else None
    return count


def _layers(values: dict, shrunk: dict) -> dict:
    """Layer counts of 2 and per-layer lists cut to the two kept layers (``_kept_layers``), per-layer
    sizes scaled (``_scaled``); lists of layer indices and per-layer references to layers are
    renumbered."""
    n = _layer_count(values)
    if n is None or n <= LAYERS:
        return {}
    per_layer = _per_layer_lists(values, n)
    references = {k for k, v in per_layer.items() if _is_layer_reference_list(v, n)}
    keep = _keep(per_layer, n)
    out = {}
    for key, value in per_layer.items():
        if key in references:
            out[key] = [keep.index(value[i]) if value[i] in keep else j for j, i in enumerate(keep)]
        elif key in _AT_MOST:  # a size given per layer (Gemma 3n's intermediate_size)
            out[key] = [min(value[i], _AT_MOST[key]) if isinstance(value[i], int) else value[i] for i in keep]
        else:
            out[key] = [_scaled(key, value[i], values, shrunk) for i in keep]
    for key, value in values.items():
        if key not in per_layer and _is_index_list(value, n):
            out[key] = [j for j, i in enumerate(keep) if i in value]
    return out


_TOKEN_SUFFIXES = ("_token_id", "_token_index", "_token_ids")


def _token_ids(values: dict, shrunk: dict) -> dict:
    """Special token ids at or above the shrunk vocabulary moved to free ids below it (from the top)."""
    vocab = shrunk.get("vocab_size", values.get("vocab_size"))
    if vocab is None:
        vocab = getattr(shrunk.get("text_config", values.get("text_config")), "vocab_size", None)
    if not isinstance(vocab, int):
        return {}
    tokens = {k: v for k, v in values.items() if k.endswith(_TOKEN_SUFFIXES)}
    as_lists = {k: (v if isinstance(v, list) else [v]) for k, v in tokens.items()}
    taken = {i for ids in as_lists.values() for i in ids if isinstance(i, int) and 0 <= i < vocab}
    free = (i for i in range(vocab - 1, -1, -1) if i not in taken)
    moved, out = {}, {}
    for key, ids in as_lists.items():
        new = []
        for i in ids:
            if isinstance(i, int) and not isinstance(i, bool) and i >= vocab:
                if i not in moved:
                    moved[i] = next(free)
                i = moved[i]
            new.append(i)
        if new != ids:
            out[key] = new if isinstance(tokens[key], list) else new[0]
    return out


def _shrunk_subconfig(parent, key: str, sub, overrides: dict | None):
    spec = type(parent).sub_configs_defaults.get(key)
    init = dict(spec.init_kwargs) if spec is not None else {}
    return type(sub)(**{**init, **_shrink_kwargs(sub, overrides, given=init)})


@functools.cache
def _tiny_kwargs(model_type: str, mapping: str) -> dict:
    from transformers import AutoConfig

    overrides = _OVERRIDES.get(model_type, {})
    try:
        default = AutoConfig.for_model(model_type)
    except Exception:  # a default config that fails its own validation, fixed by the overrides
        default = AutoConfig.for_model(model_type, **overrides)
    kwargs = _shrink_kwargs(default, overrides)
    if mapping == "causal-lm" and getattr(default, "is_decoder", True) is False:
        kwargs["is_decoder"] = True  # encoder architectures' causal-LM heads need causal attention
    pad = getattr(default, "pad_token_id", None)
    if (
        default.is_encoder_decoder
        and getattr(default, "decoder_start_token_id", None) is None
        and pad is not None
    ):
        kwargs["decoder_start_token_id"] = pad  # T5-style models start decoding at the pad id
    if mapping == "seq-cls":
        # Decoder classifiers pool at the last non-pad token, which needs a pad id when batch > 1.
        kwargs["num_labels"] = NUM_LABELS
        if getattr(default, "pad_token_id", 0) is None:
            kwargs["pad_token_id"] = 0
        text = kwargs.get("text_config")
        if text is not None and getattr(text, "pad_token_id", 0) is None:
            text.pad_token_id = 0
    return kwargs


def tiny_config(model_type: str, mapping: str, **overrides):
    """``AutoConfig.for_model(model_type)`` shrunk to a tiny model of ``mapping`` (see module docstring);
    ``overrides`` are passed on last. Raises ``TinyModelUnavailable`` if the config cannot be made."""
    from transformers import AutoConfig

    _check_mapping(mapping)
    try:
        with _quiet():
            kwargs = copy.deepcopy(_tiny_kwargs(model_type, mapping))
            return AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    except Exception as e:
        raise TinyModelUnavailable(f"config: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message; for a config validation error, its cause's."""
    if type(e).__name__ == "StrictDataclassClassValidationError" and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_tiny(model_type: str, mapping: str, seed: int = 0):
    """A tiny random ``mapping`` model of ``model_type`` (fp32, eval mode, sdpa attention where the model
    supports it, else eager), whose bare forward with labels and backward have been checked
    (``bare_check``). Raises ``TinyModelUnavailable(reason)`` otherwise."""
    from transformers.models.auto import modeling_auto

    config = tiny_config(model_type, mapping)
    try:
        model_class = getattr(modeling_auto, _MAPPING_NAMES[mapping])[type(config)]
    except Exception as e:
        raise TinyModelUnavailable(f"build: {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(config, model_class.config_class):
        # The head is built from one of the composite's sub-configs (e.g. MusicGen's decoder).
        config = next((v for v in vars(config).values() if isinstance(v, model_class.config_class)), config)
    model = None
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        error = None
        for impl in ("sdpa", "eager"):
            try:
                model = model_class._from_config(
                    copy.deepcopy(config), attn_implementation=impl, dtype=torch.float32
                )
                break
            except Exception as e:
                error = e
    if model is None:
        raise TinyModelUnavailable(f"build: {type(error).__name__}: {_first_line(error)}") from error
    model.eval()
    bare_check(model, tiny_inputs(model, mapping, seed=seed))
    return model


class _quiet:
    """Silences transformers' warnings and logging while tiny models are built and run."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._logger = logging.getLogger("transformers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        self._warnings.__exit__(*exc)


def text_config(config):
    """The config of the (decoder) language model in ``config``: its ``text_config`` / ``decoder``
    sub-config, else ``config`` itself. (Unlike ``config.get_text_config(decoder=True)``, which on
    flat encoder-decoder configs returns a copy with ``decoder_*`` fields renamed, and class defaults
    in their place, e.g. Marian's decoder_start_token_id.)"""
    if any(getattr(config, name, None) is not None for name in ("text_config", "decoder", "generator")):
        return config.get_text_config(decoder=True)
    return config


def _special_ids(config) -> set[int]:
    ids = set()
    for cfg in (config, text_config(config)):
        for key in dir(cfg):
            if key.endswith(("_token_id", "_token_index", "_token_ids")):
                try:
                    value = getattr(cfg, key)
                except Exception:
                    continue
                for i in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(i, int):
                        ids.add(i)
    return ids


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def tiny_inputs(model, mapping: str, batch: int = 2, length: int = 7, padding: str = "right", seed: int = 0):
    """Deterministic inputs for ``model`` (built by ``build_tiny``), ``(batch, length)`` long tensors:

    - ``input_ids``: random token ids that are no special ids of the config; encoder-decoder models'
      rows end with the eos id (as their tokenizers do; BART-style classifiers pool at it);
    - ``attention_mask``: ones, except that the last row (when ``batch > 1``) has 2 padding
      positions on the ``padding`` side ("right" or "left"), where the ids are the pad id;
    - ``labels``: causal-lm, and seq2seq decoder-only models: the input ids with -100 on padding;
      seq-cls: ``(batch,)`` class ids; seq2seq encoder-decoder: ``(batch, length - 2)`` target ids,
      the last one of the last row -100; the model builds its decoder inputs from them, except when
      its config has no ``decoder_start_token_id``: then ``decoder_input_ids`` (labels shifted right
      behind the pad id) and ``decoder_attention_mask`` are given too;
    - ``token_type_ids`` (zeros) where the model's forward takes them.
    """
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    _check_mapping(mapping)
    config = model.config
    text = text_config(config)
    special = _special_ids(config)
    vocab = getattr(text, "vocab_size", None) or VOCAB  # character models (CANINE) have none
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return allowed[torch.randint(len(allowed), shape, generator=g)]

    ids, mask = draw(batch, length), torch.ones(batch, length, dtype=torch.long)
    pad = text.pad_token_id if isinstance(getattr(text, "pad_token_id", None), int) else 0
    n_pad = 2 if batch > 1 else 0
    cols = slice(length - n_pad, length) if padding == "right" else slice(0, n_pad)
    mask[-1, cols] = 0
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    eos = getattr(text, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if encoder_decoder and isinstance(eos, int):
        ids[torch.arange(batch), mask.cumsum(1).argmax(1)] = eos  # the last real position of each row
    ids[-1, cols] = pad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if mapping == "seq-cls":
        inputs["labels"] = torch.randint(config.num_labels, (batch,), generator=g)
    elif mapping == "causal-lm" or not encoder_decoder:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        labels = draw(batch, max(length - 2, 2))
        labels[-1, -1] = -100
        inputs["labels"] = labels
        if not _builds_decoder_inputs(model):
            start = getattr(config, "decoder_start_token_id", None)
            start = start if isinstance(start, int) else pad
            shifted = torch.cat([torch.full((batch, 1), start), labels[:, :-1]], dim=1)
            inputs["decoder_input_ids"] = shifted.clamp(min=0)
            inputs["decoder_attention_mask"] = (shifted != -100).long()
    if "token_type_ids" in _forward_params(model):
        types = getattr(config, "type_vocab_sizes", None)  # TAPAS: one id per table feature
        inputs["token_type_ids"] = torch.zeros(*ids.shape, len(types), dtype=torch.long) if types else 0 * ids
    return inputs


def _builds_decoder_inputs(model) -> bool:
    """Whether the model's forward makes decoder inputs from labels (shifting them right)."""
    config = model.config
    if getattr(config, "decoder_start_token_id", None) is None:
        return False
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True
    return any(
        s in source for s in ("shift_tokens_right(", "_shift_right(", "decoder_input_ids_from_labels(")
    )


def bare_check(model, inputs: dict) -> None:
    """Forward of ``model`` on ``inputs`` (with labels) and backward of its loss, every parameter
    trainable; gradients are cleared afterwards. Raises ``TinyModelUnavailable`` with the exception
    text when either fails or the loss is missing or not finite."""
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    try:
        with _quiet():
            out = model(**inputs)
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if loss is None:
                raise TinyModelUnavailable("run: the model returned no loss")
            if not torch.isfinite(loss).all():
                raise TinyModelUnavailable(f"run: loss is not finite ({loss.item()})")
            loss.backward()
    except TinyModelUnavailable:
        raise
    except Exception as e:
        raise TinyModelUnavailable(f"run: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        model.zero_grad(set_to_none=True)


def iter_tiny(mapping: str) -> Iterator[tuple[str, object]]:
    """Yields ``(model_type, model)`` for every model type of ``mapping``, or ``(model_type, reason)``
    (a non-empty string) where ``build_tiny`` raises."""
    for model_type in model_types(mapping):
        try:
            yield model_type, build_tiny(model_type, mapping)
        except TinyModelUnavailable as e:
            yield model_type, str(e) or "unavailable"
        except Exception as e:  # a bug of this module or of transformers: still a reason
            yield model_type, f"unexpected: {type(e).__name__}: {_first_line(e)}"
