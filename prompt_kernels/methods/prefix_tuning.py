"""P-tuning v2 / prefix tuning (Liu et al. 2022; Li & Liang 2021): prompt keys/values at every layer.

The keys/values of all layers are one tensor ``[p, L, 2, Hkv, Dh]`` (PEFT's layout of its prefix
encoder output), computed once per forward (once per ``generate`` call) and split per layer. Models
whose layers differ in key/value heads or head sizes (or whose keys and values differ in head size)
get one row of ``sum_l Hkv_l (Dk_l + Dv_l)`` values per prompt position, split per layer in order.
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
        p = config.prompt_length
        self.kv_size = sum(h * (dk + dv) for h, dk, dv in info.kv_shapes)
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

    def all_key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key [1, Hkv, p, Dk], value [1, Hkv, p, Dv])``."""
        info, p = self.info, self.config.prompt_length
        x = self.embedding.weight
        if self.transform is not None:
            x = self.transform(x)
        x = self.dropout(x)
        if info.uniform_kv:
            x = x.view(p, info.num_layers, 2, info.num_kv_heads, info.head_dim)
            kv = x.permute(1, 2, 3, 0, 4).unsqueeze(2)
            return [(kv[i, 0], kv[i, 1]) for i in range(info.num_layers)]
        out, start = [], 0
        for h, dk, dv in info.kv_shapes:
            k = x[:, start : start + h * dk].view(p, h, dk).transpose(0, 1)
            v = x[:, start + h * dk : start + h * (dk + dv)].view(p, h, dv).transpose(0, 1)
            out.append((k[None], v[None]))
            start += h * (dk + dv)
        return out

    def prefix(self, ctx, layer_idx):
        key, value = ctx.memo("prefix_tuning", self.all_key_values)[layer_idx]
        return key, value, None
