"""prompt_kernels: fast multi-layer soft-prompt tuning for Hugging Face transformers."""

from prompt_kernels import ops
from prompt_kernels._backend import BackendUnavailableError, use_backend

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "__version__", "ops", "use_backend"]
