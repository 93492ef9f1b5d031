"""Plain-PyTorch references of every op, with the public signatures. They are the specification."""

from prompt_kernels.ops.gated_prefix_attention import (
    gated_prefix_attention_reference as gated_prefix_attention,
)
from prompt_kernels.ops.phm_linear import phm_linear_reference as phm_linear
from prompt_kernels.ops.prompt_pool import prompt_pool_reference as prompt_pool
from prompt_kernels.ops.vq import vq_nearest_reference as vq_nearest
from prompt_kernels.ops.vq import vq_quantize_reference as vq_quantize
from prompt_kernels.ops.vq import vq_sample_reference as vq_sample

__all__ = ["gated_prefix_attention", "phm_linear", "prompt_pool", "vq_nearest", "vq_quantize", "vq_sample"]
