"""ModelInfo: the dimensions and modules of an attached model that prompt methods need."""

from __future__ import annotations

import torch
from torch import nn

from prompt_kernels.patch.discovery import ENCODER, Layout
from prompt_kernels.patch.projections import find_projection


class Positions:
    """How the model numbers its tokens' positions by itself.

    ``arange`` (0..T-1 after the cache), or the RoBERTa scheme (``padding_idx + 1 + cumsum`` of the
    non-padding tokens), recognised by a learned position table with a ``padding_idx`` next to the
    word embeddings.
    """

    def __init__(self, model: nn.Module, word_embeddings: nn.Module):
        self.padding_idx: int | None = None
        for m in model.modules():
            pos = getattr(m, "position_embeddings", None)
            if (
                any(c is word_embeddings for c in m.children())
                and isinstance(pos, nn.Embedding)
                and pos.padding_idx is not None
            ):
                self.padding_idx = int(pos.padding_idx)
                break

    @property
    def first(self) -> int:
        """Position id of the first real token (also given to input-style prompt vectors)."""
        return 0 if self.padding_idx is None else self.padding_idx + 1

    def default_ids(self, input_ids: torch.Tensor | None, length: int, past: int, device) -> torch.Tensor:
        """The position ids ``[B or 1, T]`` the model would give its tokens (after ``past`` cached ones)."""
        pad = self.padding_idx
        if pad is None:
            return torch.arange(past, past + length, device=device).unsqueeze(0)
        if input_ids is not None:
            mask = input_ids.ne(pad).int()
            return ((torch.cumsum(mask, dim=1) + past) * mask).long() + pad
        return torch.arange(pad + 1, pad + 1 + length, device=device).unsqueeze(0)


class ModelInfo:
    """Read-only facts about the base model, handed to ``PromptMethod.__init__``.

    Attributes:
        model: the transformers model passed to ``attach`` (with its head, if any).
        backbone: ``model.base_model``. layout: the discovered :class:`~prompt_kernels.patch.discovery.Layout`.
        num_layers (``L``): the prompted self-attention sites (an encoder-decoder's encoder sites first,
            then its decoder's; a hybrid model's attention layers only).
        kv_shapes: per site ``(Hkv, Dk, Dv)``: key/value heads and the key and value head sizes.
        num_heads (``H``), num_kv_heads (``Hkv``), head_dim (``Dh``): of site 0 (``uniform_kv`` says
            whether every site has the same ``(Hkv, Dk, Dv)`` with ``Dk == Dv``); None on a model whose
            layers take no prompts (``layout.kind == "input"``, ``L = 0``).
        hidden_size (``d``): the width of the input embeddings (hidden-space prompts).
        causal: whether site 0's self-attention is causal. encoder_decoder: the model has both.
        layers: per site, the layer that hosts it; attentions: per site, the attention module.
        input_embeddings: the token embedding module of the stack that reads ``input_ids`` (the encoder's
            in an encoder-decoder); its output ``[B, T, d]`` is what input-style prompts are prepended to.
        positions: :class:`Positions`. dtype, device: of the model's parameters.
    """

    def __init__(self, model: nn.Module, layout: Layout):
        self.model = model
        self.layout = layout
        self.sites = layout.sites
        self.backbone = model.base_model
        self.config = model.config
        self.encoder_decoder = layout.encoder_decoder
        self.layers = [s.host for s in self.sites]
        self.attentions = [s.module for s in self.sites]
        self.num_layers = len(self.sites)
        self.kv_shapes = [(s.num_kv_heads, s.key_dim, s.value_dim) for s in self.sites]
        if self.sites:
            first = self.sites[0]
            self.num_heads, self.num_kv_heads, self.head_dim = (
                first.num_heads,
                first.num_kv_heads,
                first.key_dim,
            )
            self.uniform_kv = all(shape == self.kv_shapes[0] for shape in self.kv_shapes) and (
                first.key_dim == first.value_dim
            )
            self.causal = first.causal
        else:  # the input-only layout: no attention site takes prompts
            self.num_heads = self.num_kv_heads = self.head_dim = None
            self.uniform_kv = True
            self.causal = bool(getattr(model.config, "is_decoder", False)) or (
                not layout.encoder_decoder and bool(getattr(model, "can_generate", lambda: False)())
            )
        self.input_embeddings = self._input_embeddings(model)
        self.hidden_size = int(self.input_embeddings.weight.shape[1])
        self.positions = Positions(model, self.input_embeddings)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        # Found now, not on first use: a dict filled during a forward would recompile a torch.compile'd
        # model on its second call. None where the module has no projection we know.
        self._projections = {
            s.index: (
                None
                if layout.kind == "cache"
                else find_projection(s.module, self.hidden_size, s.num_kv_heads, s.key_dim, s.value_dim)
            )
            for s in self.sites
        }

    def _input_embeddings(self, model: nn.Module) -> nn.Module:
        try:
            if self.encoder_decoder and hasattr(model, "get_encoder"):
                encoder = model.get_encoder()
                if hasattr(encoder, "get_input_embeddings") and encoder.get_input_embeddings() is not None:
                    return encoder.get_input_embeddings()
            emb = model.get_input_embeddings()
        except (NotImplementedError, AttributeError) as exc:
            emb, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = f"get_input_embeddings() returned {type(emb).__name__}"
        weight = getattr(emb, "weight", None)
        if not isinstance(emb, nn.Module) or not torch.is_tensor(weight) or weight.dim() != 2:
            where = (
                f"; no route reaches its layers either ({self.layout.reason})" if self.layout.reason else ""
            )
            raise ValueError(
                f"{type(model).__name__} has no token embedding table [vocab, d] for prompts to join "
                f"({why}){where}"
            )
        return emb

    def sites_of(self, stack: str) -> list[int]:
        """The site indices of one stack (``"encoder"``, ``"decoder"``, or ``"model"``)."""
        return [s.index for s in self.sites if s.stack == stack]

    def in_encoder(self, layer_idx: int) -> bool:
        return self.sites[layer_idx].stack == ENCODER

    def project_key_value(self, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``layer_idx``'s frozen key/value projections of hidden-space prompts.

        hidden ``[b, p, d]`` (``b`` = B or 1) -> (key ``[b, Hkv, p, Dk]``, value ``[b, Hkv, p, Dv]``) in the
        model's dtype. No rotary position is applied to the keys; gradients flow to ``hidden``.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden-space prompts must have shape [b, p, d={self.hidden_size}], got {tuple(hidden.shape)}"
            )
        proj = self._projections.get(layer_idx)
        if proj is None and self.layout.kind == "cache":
            raise NotImplementedError(
                f"{type(self.model).__name__} takes its prompts through the key/value cache (it does not use "
                "transformers' attention interface): hidden-space prompts, which need its key/value projections, "
                "are not supported on it (prefix tuning and prompt tuning are)"
            )
        if proj is None:
            s = self.sites[layer_idx]
            raise ValueError(
                f"{type(self.model).__name__}: prompt_kernels found no key/value projection of {s.name} "
                f"({type(s.module).__name__}) that maps d={self.hidden_size} to {s.num_kv_heads} heads x "
                f"{s.key_dim}/{s.value_dim}; methods with hidden-space prompts cannot run on this model "
                "(prefix tuning and prompt tuning can)"
            )
        return proj(hidden)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The input embedding module's output for ``token_ids`` (``[..., d]``), no gradient to the table."""
        with torch.no_grad():
            return self.input_embeddings(token_ids.to(self.input_embeddings.weight.device))

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The task head: parameters of ``model`` outside the backbone, tied weights excluded."""
        inside = {id(p) for p in self.backbone.parameters()}
        return {n: p for n, p in self.model.named_parameters() if id(p) not in inside}
