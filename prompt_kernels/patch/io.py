"""Saving and loading prompts: ``prompts.safetensors`` + ``config.json`` in a folder.

``config.json`` holds the prompt config (``config_from_dict`` rebuilds any registered method's
config), and a fingerprint of the base model: its class, model type and dimensions, and samples of a
few of its weights (backbone and head separately). Loading onto a model whose backbone differs raises
ValueError naming what differs; a different head only warns (unless the head was saved with the
prompts).

The weight check does not depend on dtype or device: each sampled tensor keeps ``SAMPLES`` values at
fixed positions (as float32 numbers in the JSON), and a model matches when every sampled value agrees
within ``RTOL`` (relative; a few times bfloat16's rounding step) + ``ATOL``. Prompts trained on an fp32
model therefore load onto its bf16 or fp16 copy, on any device, while a different initialisation or
checkpoint (values apart by far more than rounding) is refused, naming the tensors that differ.
Files written before this scheme hold SHA-256 digests (``backbone_weights`` as a string); those are
still compared, by digest.

A model whose base is sharded with FSDP2 (``prompt_kernels.distributed.shard_base_model``) has the
same fingerprint as its unsharded original: classes are named as before ``fully_shard`` swapped in its
``FSDP<Class>`` subclasses, and a sampled weight that is a DTensor is gathered (``full_tensor()``) first.
That gather is a collective: on a sharded model, :func:`save_prompts` and the fingerprint comparison
of a load (``add_prompt_set``) must run on every rank of the mesh (``distributed.save_prompts`` does,
and writes from one rank only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings

import torch

FORMAT = 1
WEIGHTS_FILE = "prompts.safetensors"
CONFIG_FILE = "config.json"
HEAD_PREFIX = "head."
METHOD_PREFIX = "method."
SAMPLES = 32  # values kept per sampled tensor
MAX_TENSORS = 8  # sampled backbone tensors: the input embeddings + up to 7 matrices spread over the depth
RTOL = 2.0**-6  # 4x the largest bf16 rounding error (2**-8 relative); fp16 rounds to 2**-11
ATOL = 1e-6  # fp16 flushes values below ~6e-8 and keeps ~6e-8 absolute steps below 6e-5


# -- fingerprint ------------------------------------------------------------------------------------
def original_class(module) -> type:
    """``type(module)``, or for a module ``fully_shard`` (FSDP2) has wrapped, the class it had before
    (``fully_shard`` swaps in a dynamic subclass ``FSDP<Class>``: the first class of its MRO that is
    not an ``FSDPModule``)."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        cls = next((c for c in cls.__mro__ if not issubclass(c, fsdp_module)), cls)
    return cls


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the whole tensor of a DTensor (a sharded FSDP2 weight): ``t.full_tensor()``, a
    collective every rank of its mesh must join."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and isinstance(t, dtensor):
        return t.detach().full_tensor()
    return t


def _positions(numel: int) -> list[int]:
    k = min(SAMPLES, numel)
    if k <= 1:
        return [0] * k
    return [round(i * (numel - 1) / (k - 1)) for i in range(k)]


def _sample(t: torch.Tensor) -> dict:
    flat = full_tensor(t.detach()).reshape(-1)
    idx = torch.tensor(_positions(flat.numel()), dtype=torch.long, device=flat.device)
    values = flat.index_select(0, idx).float().cpu().tolist() if idx.numel() else []
    return {"shape": list(t.shape), "values": values}


def _samples(named: dict, names) -> dict:
    """Samples of the tensors ``names`` of ``named`` (names it lacks are left out)."""
    ok = {n: named[n] for n in names if n in named}
    return {
        "rtol": RTOL,
        "atol": ATOL,
        "tensors": {
            n: _sample(p) for n, p in ok.items() if p.is_floating_point() and p.device.type != "meta"
        },
    }


def _sampled_names(saved) -> list[str] | None:
    return list(saved["tensors"]) if isinstance(saved, dict) and "tensors" in saved else None


def _embedding_weight(model) -> torch.Tensor | None:
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    return weight if torch.is_tensor(weight) and weight.dim() == 2 else None


def _pick_backbone_tensors(model, named: dict) -> list[str]:
    """The input embeddings and up to ``MAX_TENSORS - 1`` other weight matrices of the backbone, spread
    evenly over its parameters (names relative to ``model.base_model``)."""
    emb_w = _embedding_weight(model)
    chosen = [n for n, p in named.items() if p is emb_w][:1]
    matrices = [n for n, p in named.items() if p.dim() >= 2 and p is not emb_w]
    k = min(len(matrices), MAX_TENSORS - len(chosen))
    if k > 0:
        picks = sorted({round(i * (len(matrices) - 1) / max(1, k - 1)) for i in range(k)})
        chosen += [matrices[i] for i in picks]
    return chosen


def _model_facts(model, like: dict | None = None) -> dict:
    """What can be read off ``model`` without attaching to it: classes, type, widths, weights (the
    tensors ``like`` sampled, when given: a saved fingerprint to compare with)."""
    weight = _embedding_weight(model)
    named = dict(getattr(model, "base_model", model).named_parameters())
    names = _sampled_names((like or {}).get("backbone_weights")) or _pick_backbone_tensors(model, named)
    facts = {
        "model_class": original_class(model).__name__,
        "backbone_class": original_class(getattr(model, "base_model", model)).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "backbone_weights": _samples(named, names),
    }
    if weight is not None:
        facts["vocab_size"] = int(weight.shape[0])
    return facts


def fingerprint(model, info, like: dict | None = None) -> dict:
    """Identity of ``model``'s backbone (classes, dims, samples of a few weights) and head; JSON-able and
    the same for every dtype and device of the model (see the module docstring). With ``like`` (a saved
    fingerprint), the tensors it sampled are sampled, for :func:`compare_fingerprints`."""
    facts = _model_facts(model, like)
    head = info.head_parameters()
    head_names = _sampled_names((like or {}).get("head_weights")) or sorted(head)
    return {
        "model_class": facts["model_class"],
        "backbone_class": facts["backbone_class"],
        "model_type": facts["model_type"],
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": facts.get("vocab_size", int(info.input_embeddings.weight.shape[0])),
        "backbone_weights": facts["backbone_weights"],
        "head_weights": _samples(head, head_names) if head else None,
    }


def _legacy_digest(tensors) -> str:
    """The dtype-dependent digest of files written before the sampled fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        t = full_tensor(t.detach()).float().cpu().contiguous().flatten()[:4096]
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def _legacy(model, info) -> dict:
    # The first and last prompted attention modules (the backbone itself on the cache route).
    attns = [a for a in info.attentions if a is not None] or [info.backbone]
    attn0, attn_last = attns[0], attns[-1]
    backbone = [
        full_tensor(info.input_embeddings.weight)[:16],
        *[p for _, p in sorted(attn0.named_parameters())][:2],
        *[p for _, p in sorted(attn_last.named_parameters())][-2:],
    ]
    head = [p for _, p in sorted(info.head_parameters().items())]
    return {
        "backbone_weights": _legacy_digest(backbone),
        "head_weights": _legacy_digest(head) if head else None,
    }


def _listing(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _weight_differences(saved, now, now_legacy=None) -> str | None:
    """How the sampled weights ``now`` differ from ``saved`` (None: the same weights)."""
    if saved is None or now is None:
        return None if saved is None and now is None else "present in one model only"
    if isinstance(saved, str):  # a digest from an older file
        return None if now_legacy is not None and saved == now_legacy else "digest differs"
    rtol, atol = float(saved.get("rtol", RTOL)), float(saved.get("atol", ATOL))
    tensors = saved.get("tensors", {})
    missing, differ = [], []
    for name, s in tensors.items():
        n = now.get("tensors", {}).get(name)
        if n is None:
            missing.append(name)
        elif n["shape"] != s["shape"]:
            differ.append(f"{name} (shape saved {s['shape']}, model {n['shape']})")
        else:
            worst, bad = 0.0, 0
            for a, b in zip(s["values"], n["values"]):
                if math.isnan(a) and math.isnan(b):
                    continue
                if not abs(a - b) <= atol + rtol * max(abs(a), abs(b)):
                    bad += 1
                    worst = max(worst, abs(a - b) / max(abs(a), abs(b), atol))
            if bad:
                differ.append(
                    f"{name} ({bad} of {len(s['values'])} sampled values, max relative difference {worst:.3g})"
                )
    parts = []
    if differ:
        parts.append(
            f"{len(differ)} of {len(tensors)} sampled tensors differ by more than rounding "
            f"(relative tolerance {rtol:.3g}): {_listing(differ)}"
        )
    if missing:
        parts.append(
            f"{len(missing)} of {len(tensors)} sampled tensors are not in this model: {_listing(missing)}"
        )
    return "; ".join(parts) or None


_DIMS = ("backbone_class", "model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim")


def compare_fingerprints(saved: dict, now: dict, head_saved: bool, now_legacy: dict | None = None):
    """``(differences, head_differs)``: the reasons ``now`` is not the base model of ``saved`` (empty
    when it is) and whether the task head differs. Keys missing from ``now`` are not compared."""
    diff = [
        f"{k}: saved {saved.get(k)!r}, model {now.get(k)!r}"
        for k in (*_DIMS, "vocab_size")
        if k in now and saved.get(k) != now.get(k)
    ]
    if head_saved and "model_class" in now and saved.get("model_class") != now.get("model_class"):
        diff.append(f"model_class: saved {saved.get('model_class')!r}, model {now.get('model_class')!r}")
    legacy = now_legacy or {}
    weights = _weight_differences(
        saved.get("backbone_weights"), now["backbone_weights"], legacy.get("backbone_weights")
    )
    if weights:
        diff.append("backbone_weights: " + weights)
    head_differs = False
    if "head_weights" in now:
        head_differs = bool(
            _weight_differences(saved.get("head_weights"), now["head_weights"], legacy.get("head_weights"))
        )
    return diff, head_differs


def _different_model(saved: dict, path, diff) -> ValueError:
    return ValueError(
        f"the prompts in {path} were trained on a different base model ({saved.get('model_class')}); "
        "differences: " + "; ".join(diff)
    )


# -- files ------------------------------------------------------------------------------------------
def _replace_into(path: str, name: str, write) -> None:
    """Write ``path/name`` through a temporary file and ``os.replace``: never a half-written file."""
    final = os.path.join(path, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prompt_files(pm) -> tuple[dict, dict]:
    """``(tensors, config.json contents)`` that :func:`save_prompts` writes for ``pm``: the method's
    state (and the head when trained), on the CPU, and the prompt config with the base model's
    fingerprint. On a model sharded with FSDP2 a collective (the sampled weights are gathered)."""
    tensors = {METHOD_PREFIX + k: v for k, v in pm.method.state_dict().items()}
    if pm.prompt_config.trainable_head:
        tensors.update({HEAD_PREFIX + k: v for k, v in pm.info.head_parameters().items()})
    tensors = {k: full_tensor(v.detach()).cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "prompt_config": pm.prompt_config.to_dict(),
        "base_model": fingerprint(pm.model, pm.info),
    }
    return tensors, meta


def write_prompt_files(path, tensors: dict, meta: dict) -> None:
    """Write what :func:`prompt_files` returned into the folder ``path`` (each file replaced whole)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)

    def write_config(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=1)

    _replace_into(path, WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": str(FORMAT)}))
    _replace_into(path, CONFIG_FILE, write_config)


def save_prompts(pm, path) -> None:
    """``prompts.safetensors`` + ``config.json`` in ``path``. On a model sharded with FSDP2, every rank
    must call it (see the module docstring); each writes ``path`` (for one writer:
    ``prompt_kernels.distributed.save_prompts``)."""
    write_prompt_files(path, *prompt_files(pm))


def read_prompt_files(path) -> tuple[dict, dict]:
    """``(config.json contents, prompt tensors)`` of a folder written by ``save_prompts``; ValueError
    naming the file when one is not readable (truncated, corrupted, not ours)."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise FileNotFoundError(f"{path} does not hold saved prompts ({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not readable JSON ({exc}); the file is corrupted") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "prompt_config" not in meta:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{cfg_path} is not a prompt_kernels prompt file (format {fmt!r})")
    try:
        tensors = load_file(w_path)
    except Exception as exc:  # safetensors raises SafetensorError (or OSError) on damaged files
        raise ValueError(
            f"{w_path} is not a readable safetensors file ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupted"
        ) from exc
    return meta, tensors


def load_prompts_with(attach, model, path, **options):
    """Rebuild the PromptedModel saved by ``save_prompts(path)`` on ``model`` (a fresh copy of the base model,
    in any dtype, on any device), attaching with ``attach`` (``prompt_kernels.patch.model.attach``; passed
    in so that this module, which the PromptedModel saves through, does not import it).

    Raises ValueError if ``model`` differs from the base model the prompts were trained on (naming what
    differs), or if a file in ``path`` is unreadable; ``model`` is then left as it was.
    """
    from prompt_kernels.configs import config_from_dict

    meta, tensors = read_prompt_files(path)
    w_path = os.path.join(path, WEIGHTS_FILE)
    config = config_from_dict(meta["prompt_config"])
    saved = meta.get("base_model", {})
    head_saved = any(k.startswith(HEAD_PREFIX) for k in tensors)
    # What needs no attaching (classes, widths, weights) is compared first: where the method cannot
    # even be built on a different model, that is what the error names. Once attached, the attention
    # sites' dimensions join the comparison.
    early: list[str] = []
    if not isinstance(saved.get("backbone_weights"), str):
        early, _ = compare_fingerprints(saved, _model_facts(model, like=saved), head_saved)
    try:
        pm = attach(model, config, **options)
    except Exception as exc:
        if early:
            raise _different_model(saved, path, early) from exc
        raise
    try:
        legacy = _legacy(pm.model, pm.info) if isinstance(saved.get("backbone_weights"), str) else None
        diff, head_differs = compare_fingerprints(
            saved, fingerprint(pm.model, pm.info, like=saved), head_saved, legacy
        )
        if diff:
            raise _different_model(saved, path, diff)
        method_sd = {k[len(METHOD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)}
        try:
            pm.method.load_state_dict(method_sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{w_path} does not hold the prompts of its {config.method} config: {exc}"
            ) from exc
        if head_saved:
            head = pm.info.head_parameters()
            with torch.no_grad():
                for k, v in tensors.items():
                    if k.startswith(HEAD_PREFIX):
                        name = k[len(HEAD_PREFIX) :]
                        if name not in head or head[name].shape != v.shape:
                            raise ValueError(
                                f"{w_path}: the saved head tensor {name!r} does not fit this model"
                            )
                        head[name].copy_(v)
    except BaseException:
        pm.detach()
        raise
    if not head_saved and head_differs:
        warnings.warn(
            f"the task head of {original_class(model).__name__} differs from the one the prompts in {path} were trained "
            "with; outputs will differ (save with trainable_head=True to keep the head with the prompts)",
            stacklevel=2,
        )
    return pm
