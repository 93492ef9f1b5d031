"""prompt_kernels: fast multi-layer soft-prompt tuning for Hugging Face transformers."""

from prompt_kernels import ops
from prompt_kernels._backend import BackendUnavailableError, use_backend
from prompt_kernels.configs import PrefixTuningConfig, PromptConfig, PromptTuningConfig

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PrefixTuningConfig",
    "PromptConfig",
    "PromptTuningConfig",
    "PromptedModel",
    "__version__",
    "attach",
    "load_prompts",
    "ops",
    "use_backend",
]

_PATCH_EXPORTS = ("attach", "load_prompts", "PromptedModel")


def __getattr__(name):
    # The patch layer imports transformers: loaded on first use, not with the ops.
    if name in _PATCH_EXPORTS:
        from prompt_kernels import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'prompt_kernels' has no attribute {name!r}")
