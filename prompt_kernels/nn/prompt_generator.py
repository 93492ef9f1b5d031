"""PromptGenerator: hidden states -> a fixed number of prompt vectors (SPT's per-layer generator).

    X:    [B, T, d]   hidden states entering a layer
    mask: [B, T]      nonzero / True = real token (or None: all real)
    ->    [B, p, d]   G = Dropout(Up(act(Down(Pool_{T->p}(X)))))

``Down: d -> m`` and ``Up: m -> d`` are PHM layers (``ops.phm_linear``, ``n`` rule matrices),
``Pool`` is the masked adaptive average pooling ``ops.prompt_pool``. The published order is
``Pool(Down(X))``; because pooling is linear with bin weights summing to 1,
``Pool(X W + b) = Pool(X) W + b`` for every row with at least one real token, so we pool first and
project ``p`` rows instead of ``T`` (a row without real tokens gives ``Down``'s bias instead of 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prompt_kernels import ops

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class PHMLinear(nn.Module):
    """``y = x @ H + bias`` with ``H = sum_i kron(rules[i], weights[i])`` (``ops.phm_linear``).

    Parameters: ``rules [n, n, n]``, ``weights [n, in/n, out/n]``, ``bias [out]``;
    ``n * (n * n + in * out / n**2) + out`` numbers instead of ``in * out + out``.
    Init: ``rules ~ N(0, 1)``, ``weights ~ N(0, 1 / (n * in))`` (so each entry of ``H`` has
    variance ``1 / in``, as a variance-preserving linear layer), bias 0.
    """

    def __init__(self, in_features: int, out_features: int, n: int = 4, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if v % n:
                raise ValueError(f"{name}={v} must be divisible by the PHM n={n}")
        kw = {"device": device, "dtype": dtype or torch.float32}
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.rules = nn.Parameter(torch.randn(n, n, n, **kw))
        std = 1.0 / math.sqrt(n * in_features)
        self.weights = nn.Parameter(torch.randn(n, in_features // n, out_features // n, **kw) * std)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.phm_linear(x, self.rules, self.weights, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}"


class PromptGenerator(nn.Module):
    """Input-dependent prompts: ``[B, T, d]`` (+ mask ``[B, T]``) -> ``[B, prompt_length, d]``.

    Args:
        d: hidden size (divisible by ``n``).
        prompt_length: ``p``, the number of output prompt vectors.
        bottleneck: ``m``, the PHM bottleneck width (divisible by ``n``).
        n: number of PHM rule matrices.
        activation: ``relu`` (default), ``gelu``, ``silu``, ``tanh`` or ``identity``.
        dropout: dropout probability on the output.

    Parameters are float32; the input is pooled in its own dtype and the pooled rows ``[B, p, d]``
    are cast to the parameters' dtype, so the output is in the parameters' dtype.
    """

    def __init__(
        self,
        d: int,
        prompt_length: int,
        bottleneck: int = 64,
        n: int = 4,
        activation: str = "relu",
        dropout: float = 0.1,
        device=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(prompt_length, int) or prompt_length < 1:
            raise ValueError(f"prompt_length must be an int >= 1, got {prompt_length!r}")
        self.prompt_length = prompt_length
        self.down = PHMLinear(d, bottleneck, n, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = PHMLinear(bottleneck, d, n, device=device)
        self.dropout = nn.Dropout(dropout)

    def pooled(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``Pool_{T->p}(X)`` ``[B, p, d]`` in the parameters' dtype."""
        return ops.prompt_pool(x, attention_mask, self.prompt_length).to(self.down.weights.dtype)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.down(self.pooled(x, attention_mask))
        return self.dropout(self.up(self.act(h)))
