"""Plain-PyTorch references of every op, with the public signatures. They are the specification."""

from prompt_kernels.ops.gated_prefix_attention import (
    gated_prefix_attention_reference as gated_prefix_attention,
)
from prompt_kernels.ops.phm_linear import phm_linear_reference as phm_linear
from prompt_kernels.ops.prompt_pool import prompt_pool_reference as prompt_pool

__all__ = ["gated_prefix_attention", "phm_linear", "prompt_pool"]
