"""The patch layer: attach prompt methods to transformers models (see ``model.py``).

Names are imported lazily so that ``prompt_kernels.methods`` and ``prompt_kernels.patch`` can import
each other's submodules without a cycle.
"""

import importlib

_EXPORTS = {
    "ARCHITECTURES": "prompt_kernels.patch.architectures",
    "supported_model_types": "prompt_kernels.patch.architectures",
    "IMPLEMENTATION": "prompt_kernels.patch.attention",
    "PrefixKV": "prompt_kernels.patch.attention",
    "ForwardContext": "prompt_kernels.patch.context",
    "ModelInfo": "prompt_kernels.patch.info",
    "load_prompts": "prompt_kernels.patch.io",
    "PromptedModel": "prompt_kernels.patch.model",
    "attach": "prompt_kernels.patch.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prompt_kernels.patch' has no attribute {name!r}")
