"""Saving and loading prompts: ``prompts.safetensors`` + ``config.json`` in a folder.

``config.json`` holds the prompt config (``config_from_dict`` rebuilds any registered method's
config), and a fingerprint of the base model: its class, model type and dimensions, and SHA-256
hashes of a few of its weights (backbone and head separately). Loading onto a model whose backbone
differs raises ValueError; a different head only warns (unless the head was saved with the prompts).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch

FORMAT = 1
WEIGHTS_FILE = "prompts.safetensors"
CONFIG_FILE = "config.json"
HEAD_PREFIX = "head."
METHOD_PREFIX = "method."


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().float().cpu().contiguous().flatten()[:4096]
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def fingerprint(model, info) -> dict:
    """Identity of ``model``'s backbone (dims + a hash of a few weights) and head."""
    # The first and last prompted attention modules (the backbone itself on the cache route).
    attns = [a for a in info.attentions if a is not None] or [info.backbone]
    attn0, attn_last = attns[0], attns[-1]
    backbone = [
        info.input_embeddings.weight[:16],
        *[p for _, p in sorted(attn0.named_parameters())][:2],
        *[p for _, p in sorted(attn_last.named_parameters())][-2:],
    ]
    head = [p for _, p in sorted(info.head_parameters().items())]
    return {
        "model_class": type(model).__name__,
        "backbone_class": type(info.backbone).__name__,
        "model_type": info.config.model_type,
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": int(info.input_embeddings.weight.shape[0]),
        "backbone_weights": _digest(backbone),
        "head_weights": _digest(head) if head else None,
    }


def save_prompts(pm, path) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {METHOD_PREFIX + k: v for k, v in pm.method.state_dict().items()}
    if pm.prompt_config.trainable_head:
        tensors.update({HEAD_PREFIX + k: v for k, v in pm.info.head_parameters().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": str(FORMAT)})
    meta = {
        "format": FORMAT,
        "prompt_config": pm.prompt_config.to_dict(),
        "base_model": fingerprint(pm.model, pm.info),
    }
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def _check_fingerprint(saved: dict, now: dict, path, head_saved: bool) -> None:
    keys = [
        "backbone_class",
        "model_type",
        "num_layers",
        "hidden_size",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "backbone_weights",
    ]
    diff = [f"{k}: saved {saved.get(k)!r}, model {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if head_saved and saved.get("model_class") != now.get("model_class"):
        diff.append(f"model_class: saved {saved.get('model_class')!r}, model {now.get('model_class')!r}")
    if diff:
        raise ValueError(
            f"the prompts in {path} were trained on a different base model ({saved.get('model_class')}); "
            "differences: " + "; ".join(diff)
        )
    if not head_saved and saved.get("head_weights") != now.get("head_weights"):
        warnings.warn(
            f"the task head of {now.get('model_class')} differs from the one the prompts in {path} were trained "
            "with; outputs will differ (save with trainable_head=True to keep the head with the prompts)",
            stacklevel=3,
        )


def load_prompts(model, path, **options):
    """Rebuild the PromptedModel saved by ``save_prompts(path)`` on ``model`` (a fresh copy of the base model).

    Raises ValueError if ``model`` differs from the base model the prompts were trained on.
    """
    from safetensors.torch import load_file

    from prompt_kernels.configs import config_from_dict
    from prompt_kernels.patch.model import attach

    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise FileNotFoundError(f"{path} does not hold saved prompts ({CONFIG_FILE} + {WEIGHTS_FILE})")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or "prompt_config" not in meta:
        raise ValueError(f"{cfg_path} is not a prompt_kernels prompt file (format {meta.get('format')!r})")
    config = config_from_dict(meta["prompt_config"])
    tensors = load_file(w_path)
    head_saved = any(k.startswith(HEAD_PREFIX) for k in tensors)
    pm = attach(model, config, **options)
    try:
        _check_fingerprint(meta.get("base_model", {}), fingerprint(model, pm.info), path, head_saved)
    except BaseException:
        pm.detach()
        raise
    method_sd = {k[len(METHOD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)}
    pm.method.load_state_dict(method_sd, strict=True)
    if head_saved:
        head = pm.info.head_parameters()
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith(HEAD_PREFIX):
                    head[k[len(HEAD_PREFIX) :]].copy_(v)
    return pm
