"""VIP: vector-quantised input-contextualised prompts (Bhardwaj et al., EMNLP 2022). Input style.

Shapes (``B`` batch, ``T`` tokens, ``p`` prompt length, ``d`` hidden size, ``h`` contextualiser dim,
``K`` codes, ``S`` samples)::

    P        [p, d]          soft prompt (parameter ``prompt``, init from vocabulary rows)
    E(x)     [B, T, d]       the input embedding module's output for the real tokens (frozen)
    U        [B, p + T, h]   [P; E(x)] W_in        (``contextualizer_in``: d -> h, with bias)
    U'       [B, p + T, h]   2-layer nn.TransformerEncoder (key-padding mask, the prompt always valid)
    C        [B, p, d]       U'[:, :p] W_out       (``contextualizer_out``: h -> d, with bias)
    C~       [B, p, d]       C's rows L2-normalised and scaled to the codebook norm ``n_c``
    Q        [B, p, d]       mean of S codes sampled from softmax_k(-||C~ - e_k||^2 / τ_eff)
                             (``ops.vq_sample``), straight-through to C~
    prompt   [B, p, d]       P + Q  (skip connection), prepended to the input embeddings

Scales. ``n_c`` (``codebook_norm="embedding"``, the default) is the mean L2 norm of the model's
input-embedding rows (all-zero rows excluded). ``P`` starts as vocabulary rows, so at initialisation
``|P_k| ~ |Q_k| ~ n_c``: both terms of the skip connection matter. (The paper's norm 100 suits T5,
whose embedding rows are large; on a model whose rows have norm ~1, ``Q`` would be ~100 times ``P``.)
The sampling temperature is given at the paper's norm and rescaled with it,
``τ_eff = τ (n_c / temperature_reference_norm)^2`` (100 at norm 100), so the code distribution
``softmax(-||C~ - e_k||^2 / τ_eff)`` is as sharp as the paper's at any norm (distances scale with
``n_c^2``); ``temperature_reference_norm=None`` uses ``τ`` as is.

Evaluation runs the same quantiser path as training (``sample_in_eval=True``, the default): the mean
of ``S`` sampled codes, drawn from a generator seeded with ``eval_seed`` at every forward, so eval
outputs are deterministic for a given batch (and save/load round-trips exactly); the codebook is not
updated. ``sample_in_eval=False`` uses the nearest code in eval instead (a different input to the
model than the one it was trained on: not the default, as METHODS.md asks unless a measured
comparison favours it; none was made).

The codebook ``[K, d]`` is a buffer (no gradient) of the quantiser, a
:class:`prompt_kernels.nn.VectorQuantizer` (``method.quantizer``), updated by EMA in training mode only
(``ema="vip"``: METHODS.md's update, see that module). The commitment loss ``commitment_weight * mean((C~ - sg(Q))^2)``
is the method's auxiliary loss ``"vip_commitment"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prompt_kernels.configs import (
    PromptConfig,
    check_bool,
    check_choice,
    check_float,
    check_int,
    register_config,
)
from prompt_kernels.methods.base import PromptMethod, register_method
from prompt_kernels.nn.vector_quantizer import VectorQuantizer
from prompt_kernels.ops.vq import draw_seed


@register_config
@dataclass
class VIPConfig(PromptConfig):
    """VIP (METHODS.md). Defaults follow the paper's setting.

    contextualizer_dim: width ``h`` of the contextualiser (``W_in: d -> h``, ``W_out: h -> d``). 32.
    contextualizer_layers / contextualizer_heads / contextualizer_ff: the ``nn.TransformerEncoder``
        (post-norm ``nn.TransformerEncoderLayer``, ReLU). 2 / 4 / 64. ``h`` must divide by the heads.
    contextualizer_dropout: dropout inside the encoder layers while training. 0.0.
    codebook_size: ``K``; None (default) = ``10 * prompt_length``.
    codebook_norm: the codebook is initialised from ``K`` vocabulary rows (uniformly sampled token
        ids), L2-normalised and scaled to this norm; the rows of ``C`` are normalised and scaled the
        same way before quantisation so both live on one sphere. ``"embedding"`` (default) = the mean
        norm of the model's input-embedding rows (so ``P`` and ``Q`` start with comparable norms); a
        number = that norm (the paper: 100, for T5); None = no normalisation (vocabulary rows and
        ``C`` as they are).
    temperature: ``τ`` of ``softmax(-||C~ - e_k||^2 / τ_eff)`` at the reference norm. 100.0.
    temperature_reference_norm: the codebook norm at which ``temperature`` is given; the temperature
        used is ``τ_eff = τ (n_c / reference)^2`` (the same sharpness at any codebook norm ``n_c``).
        100.0 (the paper's τ = 100 at norm 100). None = ``τ`` as is (also when ``codebook_norm`` is
        None).
    num_samples: ``S`` codes drawn per row. 10.
    commitment_weight: weight of the commitment loss. 0.1.
    ema: the codebook update of ``prompt_kernels.nn.VectorQuantizer``: ``"vip"`` (default; METHODS.md:
        ``e_k <- γ e_k + (1 - γ) m_k / N_k``) or ``"vqvae"`` (running sums, ``e_k = M_k / N_k``; a code
        drawn by no row keeps its value instead of decaying).
    ema_decay: ``γ`` of the codebook's EMA update. 0.99.
    ema_eps: Laplace smoothing ``ε`` of the EMA counts. 0.01.
    dead_code_threshold: codes whose EMA count falls below it are reset to rows of the batch. 0 = off.
    mode: ``"sample"`` (default; ``ops.vq_sample``) or ``"nearest"`` (``ops.vq_quantize``, the nearest
        code), in training and evaluation.
    sample_in_eval: with ``mode="sample"``, evaluation samples too (the training path), from a
        generator seeded with ``eval_seed`` at every forward. True (default). False = the nearest
        code in eval.
    eval_seed: the seed of the evaluation draws. 0.
    """

    method: ClassVar[str] = "vip"
    contextualizer_dim: int = 32
    contextualizer_layers: int = 2
    contextualizer_heads: int = 4
    contextualizer_ff: int = 64
    contextualizer_dropout: float = 0.0
    codebook_size: int | None = None
    codebook_norm: float | str | None = "embedding"
    temperature: float = 100.0
    temperature_reference_norm: float | None = 100.0
    num_samples: int = 10
    commitment_weight: float = 0.1
    ema: str = "vip"
    ema_decay: float = 0.99
    ema_eps: float = 0.01
    dead_code_threshold: float = 0.0
    mode: str = "sample"
    sample_in_eval: bool = True
    eval_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("contextualizer_dim", self.contextualizer_dim)
        check_int("contextualizer_layers", self.contextualizer_layers)
        check_int("contextualizer_heads", self.contextualizer_heads)
        check_int("contextualizer_ff", self.contextualizer_ff)
        if self.contextualizer_dim % self.contextualizer_heads:
            raise ValueError(
                f"contextualizer_dim ({self.contextualizer_dim}) must be divisible by contextualizer_heads "
                f"({self.contextualizer_heads})"
            )
        check_float("contextualizer_dropout", self.contextualizer_dropout, 0.0, 1.0)
        if self.contextualizer_dropout == 1.0:
            raise ValueError("contextualizer_dropout must be < 1")
        if self.codebook_size is None:
            self.codebook_size = 10 * self.prompt_length
        check_int("codebook_size", self.codebook_size)
        if isinstance(self.codebook_norm, str):
            check_choice("codebook_norm", self.codebook_norm, ("embedding",))
        elif self.codebook_norm is not None:
            check_float("codebook_norm", self.codebook_norm, 0.0, open_low=True)
            self.codebook_norm = float(self.codebook_norm)
        check_float("temperature", self.temperature, 0.0, open_low=True)
        if self.temperature_reference_norm is not None:
            check_float("temperature_reference_norm", self.temperature_reference_norm, 0.0, open_low=True)
        check_int("num_samples", self.num_samples)
        check_float("commitment_weight", self.commitment_weight, 0.0)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0)
        if self.ema_decay == 1.0:
            raise ValueError("ema_decay must be < 1 (1 would freeze the codebook)")
        check_float("ema_eps", self.ema_eps, 0.0, open_low=True)
        check_choice("ema", self.ema, ("vip", "vqvae"))
        check_float("dead_code_threshold", self.dead_code_threshold, 0.0)
        check_choice("mode", self.mode, ("sample", "nearest"))
        check_bool("sample_in_eval", self.sample_in_eval)
        check_int("eval_seed", self.eval_seed, 0)


def vocabulary_rows(info, n: int) -> torch.Tensor:
    """``[n, d]`` float32 input embeddings of ``n`` token ids drawn uniformly among the vocabulary rows
    that are not all zero (a padding row would give a degenerate code)."""
    weight = info.input_embeddings.weight
    candidates = (weight.detach() != 0).any(-1).nonzero().squeeze(-1)
    if candidates.numel() == 0:
        candidates = torch.arange(weight.shape[0], device=weight.device)
    ids = candidates[torch.randint(0, candidates.numel(), (n,), device=weight.device)]
    return info.embed_tokens(ids).float().to(info.device)


def embedding_norm(info) -> float:
    """The mean L2 norm of the input-embedding rows that are not all zero (float64 sum, deterministic)."""
    weight = info.input_embeddings.weight.detach()
    norms = weight.double().norm(dim=-1)
    norms = norms[norms > 0]
    if norms.numel() == 0:
        raise ValueError('VIP codebook_norm="embedding": the input-embedding table has only zero rows')
    return float(norms.mean())


def _scale_rows(x: torch.Tensor, norm: float | None) -> torch.Tensor:
    return x if norm is None else F.normalize(x, dim=-1) * norm


@register_method(VIPConfig)
class VIP(PromptMethod):
    """VIP: ``P + Q`` with ``Q`` the quantised contextualised prompt (module docstring).

    Trainable parameters (``h`` = contextualizer_dim, ``f`` = contextualizer_ff, ``n`` = layers)::

        p d  +  (d h + h)  +  n (4 h^2 + 2 h f + 9 h + f)  +  (h d + d)

    (prompt, W_in, the encoder layers: attention in/out projections 4h^2 + 4h, feed-forward
    2hf + h + f, two LayerNorms 4h; W_out). The codebook is a buffer: saved with the prompts, not
    trained by gradient.
    """

    def __init__(self, config: VIPConfig, info, **options):
        super().__init__(config, info)
        d, h, dev = info.hidden_size, config.contextualizer_dim, info.device
        norm = config.codebook_norm
        #: ``n_c``: the norm of the codes and of the rows of C~ (None: no normalisation).
        self.codebook_norm = embedding_norm(info) if norm == "embedding" else norm
        ref = config.temperature_reference_norm
        #: ``τ_eff``: the temperature of the code distribution.
        self.temperature = (
            config.temperature
            if ref is None or self.codebook_norm is None
            else config.temperature * (self.codebook_norm / ref) ** 2
        )
        self.prompt = nn.Parameter(vocabulary_rows(info, config.prompt_length))
        self.contextualizer_in = nn.Linear(d, h, device=dev)
        layer = nn.TransformerEncoderLayer(
            h,
            config.contextualizer_heads,
            config.contextualizer_ff,
            dropout=config.contextualizer_dropout,
            batch_first=True,
            device=dev,
        )
        self.contextualizer = nn.TransformerEncoder(
            layer, config.contextualizer_layers, enable_nested_tensor=False
        )
        self.contextualizer_out = nn.Linear(h, d, device=dev)
        # The evaluation draws' seed, drawn here once: no torch.Generator inside a traced forward.
        self._eval_seed = draw_seed(torch.Generator().manual_seed(config.eval_seed))
        self.quantizer = VectorQuantizer(
            d,
            config.codebook_size,
            mode=config.mode,
            num_samples=config.num_samples,
            temperature=self.temperature,
            commitment_weight=config.commitment_weight,
            ema=config.ema,
            decay=config.ema_decay,
            eps=config.ema_eps,
            dead_code_threshold=config.dead_code_threshold,
            init_rows=vocabulary_rows(info, config.codebook_size),
            init_scale=self.codebook_norm,
            device=dev,
        )

    def contextualize(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``C [B, p, d]`` from ``E(x) [B, T, d]`` and the real-token mask ``[B, T]`` (bool)."""
        B, p = embeddings.shape[0], self.config.prompt_length
        x = torch.cat([self.prompt[None].expand(B, -1, -1), embeddings.float()], dim=1)
        pad = torch.cat([attention_mask.new_zeros(B, p), ~attention_mask.bool()], dim=1)
        u = self.contextualizer(self.contextualizer_in(x), src_key_padding_mask=pad)
        return self.contextualizer_out(u[:, :p])

    def quantize(self, rows: torch.Tensor):
        """rows ``[B, p, d]`` -> ``(Q [B, p, d], indices [B, p] or [B, p, S], commitment loss [])``.

        Runs the quantiser module (``config.mode``; in training mode it then updates the codebook by
        EMA). In eval mode with ``mode="sample"`` the draws come from a generator seeded with
        ``eval_seed`` (deterministic), or, with ``sample_in_eval=False``, the nearest code is used
        (``ops.vq_quantize`` against the same codebook). Eval never updates the codebook.
        """
        cfg, vq = self.config, self.quantizer
        if cfg.mode == "sample" and not vq.training:
            if not cfg.sample_in_eval:
                from prompt_kernels.ops.vq import vq_quantize

                codebook = vq.codebook.to(rows.dtype)
                return tuple(vq_quantize(rows, codebook, commitment_weight=cfg.commitment_weight))
            return tuple(vq(rows, seed=self._eval_seed))
        return tuple(vq(rows))

    def input_prompts(self, ctx):
        C = self.contextualize(ctx.input_embeddings, ctx.attention_mask)
        rows = _scale_rows(C, self.codebook_norm)
        q, idx, loss = self.quantize(rows)
        ctx.cache["vip_commitment"] = loss
        ctx.cache["vip_indices"] = idx
        return self.prompt[None] + q

    def aux_losses(self, ctx, output):
        loss = ctx.cache.get("vip_commitment")
        return {} if loss is None else {"vip_commitment": loss}


__all__ = ["VIP", "VIPConfig", "embedding_norm", "vocabulary_rows"]
