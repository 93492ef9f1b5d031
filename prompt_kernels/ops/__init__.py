"""The fused ops. Each dispatches per call to Triton (CUDA), C++ (CPU) or the PyTorch reference."""

from prompt_kernels.ops.gated_prefix_attention import gated_prefix_attention
from prompt_kernels.ops.phm_linear import phm_linear
from prompt_kernels.ops.prompt_pool import prompt_pool
from prompt_kernels.ops.vq import VQOutput, VQSampleOutput, vq_nearest, vq_quantize, vq_sample

__all__ = [
    "VQOutput",
    "VQSampleOutput",
    "gated_prefix_attention",
    "phm_linear",
    "prompt_pool",
    "vq_nearest",
    "vq_quantize",
    "vq_sample",
]
