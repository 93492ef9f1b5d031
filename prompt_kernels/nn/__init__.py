"""Trainable building blocks of the prompt methods (modules built on ``prompt_kernels.ops``)."""

from prompt_kernels.nn.prompt_generator import PHMLinear, PromptGenerator
from prompt_kernels.nn.vector_quantizer import VectorQuantizer

__all__ = ["PHMLinear", "PromptGenerator", "VectorQuantizer"]
