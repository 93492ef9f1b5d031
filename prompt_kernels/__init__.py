"""prompt_kernels: fast multi-layer soft-prompt tuning for Hugging Face transformers."""

from prompt_kernels import ops
from prompt_kernels._backend import BackendUnavailableError, use_backend
from prompt_kernels.configs import PrefixTuningConfig, PromptConfig, PromptTuningConfig

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "GPCConfig",
    "HiPromptConfig",
    "InfoPromptConfig",
    "PrefixTuningConfig",
    "PromptConfig",
    "PromptTuningConfig",
    "PromptedModel",
    "SPTConfig",
    "VIPConfig",
    "__version__",
    "attach",
    "load_prompts",
    "ops",
    "use_backend",
]

_PATCH_EXPORTS = ("attach", "load_prompts", "PromptedModel")
# Configs of methods whose modules import the patch layer (transformers): loaded on first use.
_METHOD_CONFIGS = {
    "VIPConfig": "vip",
    "InfoPromptConfig": "infoprompt",
    "SPTConfig": "spt",
    "GPCConfig": "gpc",
    "HiPromptConfig": "hiprompt",
}


def __getattr__(name):
    # The patch layer imports transformers: loaded on first use, not with the ops.
    if name in _PATCH_EXPORTS:
        from prompt_kernels import patch

        return getattr(patch, name)
    if name in _METHOD_CONFIGS:
        import importlib

        return getattr(importlib.import_module(f"prompt_kernels.methods.{_METHOD_CONFIGS[name]}"), name)
    raise AttributeError(f"module 'prompt_kernels' has no attribute {name!r}")
