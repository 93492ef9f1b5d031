"""Hidden-space prompts through a layer's own key/value projections (``patch/projections.py``): the
key norm applied where the modeling code applies it, over the whole projection (OLMo 2: RMSNorm of
``Hkv * Dk`` before the split into heads) or per head (Qwen3: of ``Dk`` after it)."""

from __future__ import annotations

import pytest
import torch
from patch_helpers import one_thread  # noqa: F401  (autouse fixture)

import prompt_kernels as pk
from prompt_kernels.testing.tiny_models import build_tiny


@pytest.mark.parametrize("model_type,full_width", [("olmo2", True), ("qwen3", False), ("llama", None)])
def test_projection_matches_the_modeling_code(model_type, full_width):
    model = build_tiny(model_type, "causal-lm")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=2))
    site = pm.info.sites[0]
    attn = site.module
    hkv, dk = site.num_kv_heads, site.key_dim
    h = torch.randn(3, 5, pm.info.hidden_size)
    key, value = pm.info.project_key_value(0, h)
    with torch.no_grad():
        k = attn.k_proj(h)
        if full_width:
            assert attn.k_norm.weight.numel() == hkv * dk
            k = attn.k_norm(k)
        k = k.view(3, 5, hkv, dk)
        if full_width is False:
            assert attn.k_norm.weight.numel() == dk
            k = attn.k_norm(k)
        v = attn.v_proj(h).view(3, 5, hkv, site.value_dim)
    torch.testing.assert_close(key, k.transpose(1, 2))
    torch.testing.assert_close(value, v.transpose(1, 2))
