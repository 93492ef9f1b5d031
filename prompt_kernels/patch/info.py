"""ModelInfo: the dimensions and modules of an attached model that prompt methods need."""

from __future__ import annotations

import torch
from torch import nn

from prompt_kernels.patch import architectures as archs


class ModelInfo:
    """Read-only facts about the base model, handed to ``PromptMethod.__init__``.

    Attributes:
        model: the transformers model passed to ``attach`` (with its head, if any).
        backbone: ``model.base_model`` (e.g. ``BertModel``, ``LlamaModel``).
        arch: the :class:`~prompt_kernels.patch.architectures.Architecture` row.
        num_layers (``L``), hidden_size (``d``), num_heads (``H``), num_kv_heads (``Hkv``), head_dim (``Dh``).
        causal: whether the self-attention is causal.
        layers: the ``L`` layer modules; attentions: their self-attention modules.
        input_embeddings: the token embedding module (``model.get_input_embeddings()``); its output
            (``[B, T, d]``) is what input-style prompts are prepended to.
        dtype, device: of the model's parameters.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = archs.resolve(model)
        self.backbone = model.base_model
        self.config = model.config
        self.layers = archs.layer_modules(model, self.arch)
        self.attentions = [archs.attention_module(layer, self.arch) for layer in self.layers]
        cfg = self.config
        self.num_layers = len(self.layers)
        self.hidden_size = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads)
        self.causal = bool(getattr(self.attentions[0], "is_causal", self.arch.is_causal(cfg)))
        self.input_embeddings = model.get_input_embeddings()
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._check_projection_shapes()

    def _check_projection_shapes(self) -> None:
        n = self.num_kv_heads * self.head_dim
        attn = self.attentions[0]
        if self.arch.fused_qkv is not None:
            w = archs.get_module(attn, self.arch.fused_qkv).weight
            ok = w.shape[1] == 3 * n
        else:
            ok = archs.get_module(attn, self.arch.key).weight.shape[0] == n
        if not ok:
            raise ValueError(
                f"{type(self.model).__name__}: key projection size does not match num_kv_heads={self.num_kv_heads} "
                f"x head_dim={self.head_dim}"
            )

    def project_key_value(self, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s frozen key/value projections of hidden-space prompts.

        hidden ``[b, p, d]`` (``b`` = B or 1) -> (key, value) each ``[b, Hkv, p, Dh]`` in the model's dtype.
        No rotary position is applied to the keys; gradients flow to ``hidden``.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden-space prompts must have shape [b, p, d={self.hidden_size}], got {tuple(hidden.shape)}"
            )
        return archs.project_key_value(
            self.attentions[layer_idx], self.arch, hidden, self.num_kv_heads, self.head_dim
        )

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The input embedding module's output for ``token_ids`` (``[..., d]``), no gradient to the table."""
        with torch.no_grad():
            return self.input_embeddings(token_ids.to(self.input_embeddings.weight.device))

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The task head: parameters of ``model`` outside the backbone, tied weights excluded."""
        inside = {id(p) for p in self.backbone.parameters()}
        return {n: p for n, p in self.model.named_parameters() if id(p) not in inside}
