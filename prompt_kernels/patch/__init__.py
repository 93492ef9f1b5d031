"""The patch layer: attach prompt methods to transformers models (see ``model.py``).

Names are imported lazily: importing ``prompt_kernels.patch`` does not import transformers.
"""

import importlib

_EXPORTS = {
    "IMPLEMENTATION": "prompt_kernels.patch.attention",
    "PrefixKV": "prompt_kernels.methods.base",
    "ForwardContext": "prompt_kernels.patch.context",
    "Layout": "prompt_kernels.patch.discovery",
    "AttentionSite": "prompt_kernels.patch.discovery",
    "ModelInfo": "prompt_kernels.patch.info",
    "load_prompts": "prompt_kernels.patch.model",
    "PromptedModel": "prompt_kernels.patch.model",
    "attach": "prompt_kernels.patch.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prompt_kernels.patch' has no attribute {name!r}")
