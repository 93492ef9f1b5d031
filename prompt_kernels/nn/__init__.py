"""Trainable building blocks of the prompt methods (modules built on ``prompt_kernels.ops``)."""

from prompt_kernels.nn.prompt_generator import PHMLinear, PromptGenerator

__all__ = ["PHMLinear", "PromptGenerator"]
