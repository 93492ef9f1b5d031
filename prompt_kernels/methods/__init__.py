"""Prompt methods. Each lives in ``prompt_kernels/methods/<method>.py`` with its config; the base class
and registry are in ``base.py``. Modules of other methods are imported on demand (by config name)."""

from prompt_kernels.methods import prefix_tuning, prompt_tuning
from prompt_kernels.methods.base import PrefixKV, PromptMethod, build_method, method_class, register_method

__all__ = [
    "PrefixKV",
    "PromptMethod",
    "build_method",
    "method_class",
    "prefix_tuning",
    "prompt_tuning",
    "register_method",
]
