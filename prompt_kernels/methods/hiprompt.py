"""HiPrompt: higher-order interactions of multi-layer prompts (our formulation, METHODS.md). Prefix style.

Shapes (``L`` layers, ``p`` prompt length, ``d`` hidden size, ``r`` interaction rank)::

    Z        [L, p, d]     base prompts (parameter ``prompts``), or low rank ``A_l B``
                           (``prompt_factors [L, p, k]`` @ ``prompt_basis [k, d]``)
    E        [L, p, r]     Z W_e                                   (``embed``: d -> r, no bias)
    s_k      [p, r]        sum_m E_m^k  (elementwise powers, k = 1, 2)
    I2       [L, p, r]     E_l * (s_1 - E_l)                       (sum over pairs l != m of E_l E_m)
    I3       [L, p, r]     E_l * e2_{-l},  e2_{-l} = ((s_1 - E_l)^2 - (s_2 - E_l^2)) / 2
                           (the second elementary symmetric polynomial of the other layers)
    P        [L, p, d]     Z + W_2 LN_2(I2) + W_3 LN_3(I3)         (``order2_out``, ``order3_out``: r -> d,
                                                                    no bias, zero-initialised)

Scale at initialisation: ``W_e`` starts normal with standard deviation ``1 / (sqrt(d) σ_Z)`` (``σ_Z`` the
base prompts' initial standard deviation), so ``E`` has unit variance, ``I2`` about ``L - 1`` and ``I3``
about ``(L - 1)(L - 2) / 2``: far above the LayerNorms' eps (1e-5), so ``LN_2`` and ``LN_3`` normalise
from the first step. (With PyTorch's default ``Linear`` init and vocabulary-scale prompts, ``E`` had
entries ~0.01 and ``I3`` a variance ~1e-8 below the eps: the LayerNorm then acted as a fixed scaling
``x / sqrt(eps)``, not as a normalisation.)

All layers' ``P`` are computed once per forward (``ctx.memo``) with stacked tensors (no loop over
pairs or layers); layer ``l``'s prompt keys/values are ``P_l`` through its frozen key/value
projections (``ctx.project_key_value``), gate 1. At initialisation ``W_2 = W_3 = 0``, so the model is
plain deep prompt tuning with prompts ``Z``; ``max_order=1`` keeps it so (no interaction parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prompt_kernels.configs import PromptConfig, check_choice, check_int, register_config
from prompt_kernels.methods.base import PromptMethod, register_method


@register_config
@dataclass
class HiPromptConfig(PromptConfig):
    """HiPrompt (METHODS.md, our formulation).

    prompt_length: ``p``, prompt vectors per layer.
    rank: ``r``, width of the interaction space (``W_e: d -> r``, ``W_2, W_3: r -> d``). 64.
    max_order: highest interaction order: 1 (plain deep prompt tuning), 2 (+ pairs) or 3 (+ triples,
        default).
    base_rank: None (default) = full base prompts ``Z_l [p, d]``; an int ``k`` = low-rank
        ``Z_l = A_l B`` with ``A_l [p, k]`` per layer and ``B [k, d]`` shared by the layers.
    """

    method: ClassVar[str] = "hiprompt"
    rank: int = 64
    max_order: int = 3
    base_rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int("rank", self.rank)
        check_choice("max_order", self.max_order, (1, 2, 3))
        if self.base_rank is not None:
            check_int("base_rank", self.base_rank)


def interaction_terms(E: torch.Tensor, max_order: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``E [L, ..., r]`` -> ``(I2, I3)`` each ``[L, ..., r]`` (None above ``max_order``), via power sums.

    ``I2_l = sum_{m != l} E_l E_m``, ``I3_l = sum_{m < n; m, n != l} E_l E_m E_n`` (elementwise)."""
    if max_order < 2:
        return None, None
    s1 = E.sum(0)
    others = s1 - E
    I2 = E * others
    if max_order < 3:
        return I2, None
    s2 = (E * E).sum(0)
    e2 = (others * others - (s2 - E * E)) / 2
    return I2, E * e2


@register_method(HiPromptConfig)
class HiPrompt(PromptMethod):
    """Deep prompts refined by their pairwise and triple interactions across layers.

    Trainable parameters (``L`` layers, ``k`` = base_rank)::

        base prompts:  L p d                 (or L p k + k d with base_rank)
        max_order >= 2:  d r (W_e) + 2 r (LN_2) + r d (W_2)
        max_order == 3:  + 2 r (LN_3) + r d (W_3)

    Base prompts start normal with the standard deviation ``σ_Z`` of the vocabulary embeddings; ``W_e``
    normal with standard deviation ``1 / (sqrt(d) σ_Z)`` (unit-variance ``E``); ``W_2 = W_3 = 0``.
    """

    def __init__(self, config: HiPromptConfig, info, **options):
        super().__init__(config, info)
        L, p, d, r, dev = info.num_layers, config.prompt_length, info.hidden_size, config.rank, info.device
        std = float(info.input_embeddings.weight.detach().float().std())
        k = config.base_rank
        if k is None:
            self.prompts = nn.Parameter(torch.randn(L, p, d, device=dev) * std)
        else:
            self.prompt_factors = nn.Parameter(torch.randn(L, p, k, device=dev) / k**0.5)
            self.prompt_basis = nn.Parameter(torch.randn(k, d, device=dev) * std)
        if config.max_order >= 2:
            self.embed = nn.Linear(d, r, bias=False, device=dev)
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / (d**0.5 * max(std, 1e-12)))  # E ~ unit variance
            self.order2_norm = nn.LayerNorm(r, device=dev)
            self.order2_out = nn.Linear(r, d, bias=False, device=dev)
            nn.init.zeros_(self.order2_out.weight)
        if config.max_order >= 3:
            self.order3_norm = nn.LayerNorm(r, device=dev)
            self.order3_out = nn.Linear(r, d, bias=False, device=dev)
            nn.init.zeros_(self.order3_out.weight)

    def base_prompts(self) -> torch.Tensor:
        """``Z [L, p, d]``."""
        if self.config.base_rank is None:
            return self.prompts
        return self.prompt_factors @ self.prompt_basis

    def all_prompts(self) -> torch.Tensor:
        """``P [L, p, d]``: every layer's refined hidden-space prompt."""
        Z = self.base_prompts()
        order = self.config.max_order
        if order < 2:
            return Z
        I2, I3 = interaction_terms(self.embed(Z), order)
        P = Z + self.order2_out(self.order2_norm(I2))
        if I3 is not None:
            P = P + self.order3_out(self.order3_norm(I3))
        return P

    def prefix(self, ctx, layer_idx):
        P = ctx.memo("hiprompt_prompts", self.all_prompts)
        key, value = ctx.project_key_value(layer_idx, P[layer_idx][None])
        return key, value, None


__all__ = ["HiPrompt", "HiPromptConfig", "interaction_terms"]
