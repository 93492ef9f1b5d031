"""ForwardContext: the per-forward state a PromptedModel hands to its method's hooks.

One context is created by the model's forward pre-hook for every forward call of an attached model
(nested forwards, e.g. a method running the batch again inside ``aux_losses``, get their own) and is
owned by that PromptedModel: nothing lives in module globals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from prompt_kernels._backend import requested_backend
from prompt_kernels.patch.attention import convert_mask
from prompt_kernels.patch.discovery import DECODER
from prompt_kernels.patch.info import ModelInfo

# The keyword a model's forward takes its key/value cache under: ``cache`` since transformers 5.24
# (``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``, and what ``generate`` passes),
# ``past_key_values`` before (and still accepted, renamed by that decorator after our hooks ran).
CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]):
    """The key/value cache among a forward call's keyword arguments (either name), or None."""
    for name in CACHE_KWARGS:
        past = kwargs.get(name)
        if past is not None:
            return past
    return None


class ForwardContext:
    """What a method can read (and memoise) during one forward.

    Attributes (``B`` batch, ``T`` real tokens of this call, ``d`` hidden size):
        info: :class:`~prompt_kernels.patch.info.ModelInfo` (dims, layers, projections).
        kwargs: the keyword arguments of the call as the user passed them (positional ones bound
            to their names), before any prompt was added. Do not modify.
        input_ids: ``[B, T]`` or None (when the caller passed ``inputs_embeds``).
        attention_mask: ``[B, T]`` bool, True = real token (all True when the caller passed none). For a
            cached decoding step ``T`` is the number of new tokens; ``past_attention_mask`` is then the
            caller's full 2D mask ``[B, past + T]`` (or None).
        labels: the caller's labels or None.
        batch_size, seq_len, device: of this call.
        past_length: tokens already in the key/value cache (0 without a cache), as the model counts them.
        decoding: ``past_length > 0`` (a generation step after the prefill).
        training: ``model.training``.
        depth: 0 for an outermost forward, 1 for a forward run inside another one (e.g. from ``aux_losses``).
        cache: a dict for the method's own per-forward values (see :meth:`memo`).
        output: the model's output, set before ``aux_losses`` is called.
        sequence_rows: ``[B|1, p, d]`` the sequence-style rows after the last layer (set after the forward).
    """

    def __init__(self, owner, kwargs: dict[str, Any], depth: int):
        self.owner = owner
        self.info: ModelInfo = owner.info
        self.kwargs = kwargs
        self.depth = depth
        # Per-forward storage, one dict per prompt set (``scope``): several named prompt sets in one
        # batch never see each other's memos. The patch layer and the default set use scope None.
        self._caches: dict[Any, dict[Any, Any]] = {None: {}}
        self._scope = None
        self.row_sets: dict[str, torch.Tensor] | None = None  # prompt set name -> its batch rows
        self.output = None
        self.sequence_rows: torch.Tensor | None = None
        self.prompt_cache = None  # the cache route's prompts, until the base model receives them
        self.prompt_cache_length = 0  # the cache route: prompt rows in front of the tokens' keys/values
        self.tokens_past = 0  # the cache route, decoding: tokens (not prompts) already in the cache
        self.checkpoint_flags: list = []  # the cache route: layer flags set for this forward, restored after
        self.training = owner.model.training
        self.grad_enabled = torch.is_grad_enabled()  # the caller's mode (layers may run under no_grad)

        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        self.input_ids = ids
        self._inputs_embeds = embeds
        ref = ids if ids is not None else embeds
        # An encoder-decoder's decoder call with the encoder's output given (generate): no encoder input.
        self.decoder_only_call = ref is None and self.info.encoder_decoder
        if self.decoder_only_call:
            ref = next(
                (
                    kwargs[k]
                    for k in ("decoder_input_ids", "decoder_inputs_embeds")
                    if kwargs.get(k) is not None
                ),
                None,
            )
        if ref is None:
            raise ValueError("prompt_kernels: the forward call needs input_ids or inputs_embeds")
        self.batch_size, self.seq_len = int(ref.shape[0]), int(ref.shape[1])
        self.device = ref.device
        self.labels = kwargs.get("labels")

        past = cache_argument(kwargs)
        # The self-attention key/value cache (an encoder-decoder's decoder keeps it inside its cache).
        self.kv_cache = getattr(past, "self_attention_cache", past)
        self.past_length = (
            int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        )
        self.decoding = self.past_length > 0
        mask = None if self.decoder_only_call else kwargs.get("attention_mask")
        self.past_attention_mask = None
        if mask is not None and mask.dim() == 2:
            if mask.shape[1] != self.seq_len:
                self.past_attention_mask = mask.bool()
                mask = mask[:, -self.seq_len :]
            self.attention_mask = mask.bool()
        else:
            self.attention_mask = torch.ones(
                self.batch_size, self.seq_len, dtype=torch.bool, device=self.device
            )

        # Filled by the PromptedModel while the forward runs.
        # Eager CPU inference on the auto backend: prompted layers call the op's CPU path directly.
        self.direct_cpu = (
            not torch.compiler.is_compiling()  # first: Dynamo does not trace the ContextVar read below
            and not torch.is_grad_enabled()
            and self.device.type == "cpu"
            and requested_backend() == "auto"
        )
        self.host_calls: dict[int, int] = {}  # calls of each host layer so far (layers run several times)
        self.layer_inputs: dict[int, torch.Tensor] = {}
        self.rows_in_front: dict[int, int] = {}  # prompt rows in front of layer_inputs[l]
        self.input_prompt_length = 0
        self._masks: dict[int, tuple] = {}

    # -- what methods read --------------------------------------------------------------------------
    @property
    def input_embeddings(self) -> torch.Tensor:
        """``[B, T, d]`` the input embedding module's output for the real tokens (no prompt).

        Computed on first use (or the caller's ``inputs_embeds``), or kept (a detached copy) from the
        model's own lookup in this forward; carries no gradient to the frozen table.
        """
        if self._inputs_embeds is None:
            self._inputs_embeds = self.info.input_embeddings(self.input_ids)
        return self._inputs_embeds

    def layer_input(self, layer_idx: int, real_only: bool = False) -> torch.Tensor:
        """``X^l``: the hidden states entering layer ``layer_idx`` (``[B, n + T, d]``), where ``n`` prompt rows
        (input style, or sequence style from an earlier layer) sit in front; ``real_only`` drops them.
        ``layer_input(0)`` is the embedding block's output. Only layers already reached are available
        (``prefix(ctx, l)`` may read layers ``<= l``)."""
        if self.info.layout.kind == "cache":
            raise NotImplementedError(
                f"{type(self.info.model).__name__} takes its prompts through the key/value cache (it does not use "
                "transformers' attention interface): its layers' inputs are not available to prompt methods"
            )
        if layer_idx not in self.layer_inputs:
            raise KeyError(f"layer {layer_idx} has not been reached yet in this forward")
        x = self.layer_inputs[layer_idx]
        n = self.rows_in_front.get(layer_idx, 0)
        return x[:, n:] if real_only and n else x

    def layer_mask(self, layer_idx: int) -> torch.Tensor:
        """``[B, T_l]`` bool, True = real token: the mask of the real tokens entering layer ``layer_idx``
        (``layer_input(layer_idx, real_only=True)``). ``attention_mask``, except in an encoder-decoder's
        decoder, whose tokens are the decoder's (``decoder_attention_mask``, else all real)."""
        if self.info.sites[layer_idx].stack != DECODER:
            return self.attention_mask
        x = self.layer_input(layer_idx, real_only=True)
        return self._decoder_mask(x.shape[0], x.shape[1], x.device)

    @property
    def output_mask(self) -> torch.Tensor:
        """``[B, T_out]`` bool: the real tokens of the model output's sequence (the decoder's in an
        encoder-decoder, whose logits cover the decoder tokens; else ``attention_mask``)."""
        if not self.info.encoder_decoder:
            return self.attention_mask
        out = self.output
        h = None
        for name in ("logits", "last_hidden_state"):
            h = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
            if h is not None:
                break
        if h is None or h.dim() < 3:
            return self.attention_mask  # [B, C] outputs: no sequence to mask
        return self._decoder_mask(h.shape[0], h.shape[1], h.device)

    def _decoder_mask(self, B: int, T: int, device) -> torch.Tensor:
        mask = self.kwargs.get("decoder_attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T:
            return mask[:, mask.shape[1] - T :].bool()
        return torch.ones(B, T, dtype=torch.bool, device=device)

    @property
    def embedding_output(self) -> torch.Tensor:
        """``[B, T, d]`` the real tokens' output of the embedding block (= ``layer_input(0, real_only=True)``)."""
        return self.layer_input(0, real_only=True)

    def project_key_value(self, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden-space prompts ``[B|1, p, d]`` -> layer ``layer_idx``'s (key, value) ``[B|1, Hkv, p, Dh]``
        through its frozen projections (no rotary on the keys). See ModelInfo.project_key_value."""
        return self.info.project_key_value(layer_idx, hidden)

    @property
    def cache(self) -> dict[Any, Any]:
        """A dict for the method's own per-forward values (one per prompt set; see :meth:`memo`)."""
        return self._caches.setdefault(self._scope, {})

    @contextlib.contextmanager
    def scope(self, name):
        """Within this block ``cache`` and ``memo`` are prompt set ``name``'s (None: the default set)."""
        previous, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = previous

    def memo(self, key, fn: Callable[[], Any]):
        """``fn()`` computed once per forward under ``key`` (e.g. all layers' prefixes at once)."""
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def kwargs_without_labels(self) -> dict[str, Any]:
        """This call's keyword arguments for a nested forward that needs no loss: ``labels=None``. An
        encoder-decoder whose decoder input comes from token labels ``[B, T]`` (none given) gets it from the
        model's ``prepare_decoder_input_ids_from_labels`` instead (or keeps its labels where it has none);
        class labels (``[B]``, or float ``[B, C]``) never were decoder input: the model builds that from
        ``input_ids`` as in the call itself."""
        kwargs = dict(self.kwargs)
        labels = kwargs.get("labels")
        if labels is None:
            return kwargs
        token_labels = torch.is_tensor(labels) and labels.dim() == 2 and not labels.is_floating_point()
        needs_decoder_input = (
            self.info.encoder_decoder
            and token_labels
            and kwargs.get("decoder_input_ids") is None
            and kwargs.get("decoder_inputs_embeds") is None
        )
        if needs_decoder_input:
            prepare = getattr(self.info.model, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                return kwargs
            kwargs["decoder_input_ids"] = prepare(labels=labels)
        kwargs["labels"] = None
        return kwargs

    def forward_without_prompts(self, **overrides):
        """Run the same call through the model with every prompt disabled (nested forward).

        Returns the model's output; ``overrides`` replace keyword arguments (e.g. ``labels=None``).
        """
        kwargs = {**self.kwargs, **overrides}
        with self.owner.disabled():
            return self.owner.model(**kwargs)

    # -- used by the PromptedModel -------------------------------------------------------------------
    def converted_mask(self, mask: torch.Tensor, causal: bool):
        """convert_mask() once per forward per mask object (layers usually share one)."""
        hit = self._masks.get(id(mask))
        if hit is None or hit[0] is not mask:
            hit = (mask, *convert_mask(mask, self.batch_size, causal))
            self._masks[id(mask)] = hit
        return hit[1], hit[2]
