"""P-tuning v2 / prefix tuning (Liu et al. 2022; Li & Liang 2021): prompt keys/values at every layer.

The keys/values of all layers are one tensor ``[p, L, 2, Hkv, Dh]`` (PEFT's layout of its prefix
encoder output), computed once per forward (once per ``generate`` call) and split per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from prompt_kernels.configs import PrefixTuningConfig
from prompt_kernels.methods.base import PromptMethod, register_method


@register_method(PrefixTuningConfig)
class PrefixTuning(PromptMethod):
    """``embedding: Embedding(p, 2 L Hkv Dh)``, or with ``prefix_projection``
    ``embedding: Embedding(p, d)`` -> ``transform: Linear(d, r) -> tanh -> Linear(r, 2 L Hkv Dh)``
    (the parameter names and layout of PEFT's PrefixEncoder); dropout on the keys/values; gate 1."""

    def __init__(self, config: PrefixTuningConfig, info, **options):
        super().__init__(config, info)
        p, L = config.prompt_length, info.num_layers
        self.kv_size = 2 * L * info.num_kv_heads * info.head_dim
        if config.prefix_projection:
            r = config.projection_hidden_size
            self.embedding = nn.Embedding(p, info.hidden_size, device=info.device)
            self.transform = nn.Sequential(
                nn.Linear(info.hidden_size, r, device=info.device),
                nn.Tanh(),
                nn.Linear(r, self.kv_size, device=info.device),
            )
        else:
            self.embedding = nn.Embedding(p, self.kv_size, device=info.device)
            self.transform = None
        self.dropout = nn.Dropout(config.prefix_dropout)

    def all_key_values(self) -> torch.Tensor:
        """``[L, 2, 1, Hkv, p, Dh]``: every layer's prompt key (index 0) and value (index 1)."""
        info, p = self.info, self.config.prompt_length
        x = self.embedding.weight
        if self.transform is not None:
            x = self.transform(x)
        x = self.dropout(x)
        x = x.view(p, info.num_layers, 2, info.num_kv_heads, info.head_dim)
        return x.permute(1, 2, 3, 0, 4).unsqueeze(2)

    def prefix(self, ctx, layer_idx):
        kv = ctx.memo("prefix_tuning", self.all_key_values)
        return kv[layer_idx, 0], kv[layer_idx, 1], None
