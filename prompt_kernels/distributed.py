"""FSDP2 for a PromptedModel: the frozen base model sharded, the prompts replicated.

:func:`shard_base_model` applies ``torch.distributed.fsdp.fully_shard`` to every layer of the base model,
to its input embeddings (unless tied to the output embeddings) and then to the base model itself
(``pm.model``: the rest, e.g. the final norm and the head). The prompt
method (``pm.method``, ``pm.prompt_sets``) and every trainable parameter inside the base model (the
task head with ``trainable_head=True``) are *not* sharded: they stay plain tensors, broadcast from
rank 0 once and then kept identical on every rank by averaging their gradients across the ranks
after each backward (an all-reduce from a hook on each parameter, as DDP does). Why replicated rather
than sharded by FSDP as well:

- they are small (kilobytes to a few megabytes), so sharding them saves next to nothing, while the
  frozen base model, which holds all the memory, is sharded;
- ``pm.state_dict()``, ``save_prompts`` and ``Trainer`` checkpoints stay plain tensors (no DTensor,
  no gathering), and any optimizer runs on them unchanged;
- the prompt methods' own code (indexing, codebooks, in-place buffer updates) never meets a DTensor.

The base model's frozen weights get no gradient, so FSDP never reduce-scatters anything: per step it
all-gathers each layer's weights in the forward and again in the backward (needed for the gradient
with respect to the activations), as for any frozen FSDP module.

Saving: ``pm.save_prompts`` writes a fingerprint of the base model (samples of a few of its weights,
and its class names): on a sharded model the sampled weights are gathered (``full_tensor()``) and the
classes named as before ``fully_shard``, so the folder loads onto an unsharded model
(``prompt_kernels.load_prompts``) like any other. The gather is a collective: call
``pm.save_prompts`` on every rank (each writes the folder), or :func:`save_prompts`, also on every
rank, which writes from one rank only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["replicated_parameters", "save_prompts", "shard_base_model"]


def _layers(pm) -> list[nn.Module]:
    """The base model's layers: the elements of the ``nn.ModuleList``\\ s that hold the prompted layers
    (the hosts found by ``attach``), in order, each once."""
    hosts = {id(h) for h in pm.info.layout.hosts}
    layers: list[nn.Module] = []
    seen: set[int] = set()
    for module in pm.model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for child in module:
            if id(child) in seen:
                continue
            if id(child) in hosts or any(id(m) in hosts for m in child.modules()):
                seen.add(id(child))
                layers.append(child)
    return layers


def replicated_parameters(pm) -> list[nn.Parameter]:
    """The parameters :func:`shard_base_model` leaves unsharded: the prompt methods' (default set and
    ``prompt_sets``) and those of the base model that require a gradient (the head with
    ``trainable_head=True``)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    base = [p for p in pm.model.parameters() if p.requires_grad]
    for p in [*pm.method.parameters(), *pm.prompt_sets.parameters(), *base]:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def shard_base_model(
    pm,
    *,
    mesh=None,
    group=None,
    average_gradients: bool = True,
    reshard_after_forward: bool = True,
    **fsdp_kwargs,
):
    """Shard ``pm``'s frozen base model with FSDP2 and replicate its prompts; returns ``pm``.

    Call it on every rank after ``torch.distributed.init_process_group`` and after ``attach`` (the
    probe forward runs on the full model), with the same base model weights on every rank (e.g.
    ``from_pretrained``). ``mesh`` (a 1-D ``DeviceMesh``; default: all ranks on the process group's
    device type), ``reshard_after_forward`` and the other keyword arguments (``mp_policy``,
    ``offload_policy``) go to ``fully_shard``; ``group``: the ranks the prompts are replicated over
    (default: a 1-D ``mesh``'s group, else the world). The replicated parameters (see
    :func:`replicated_parameters`) and the prompt methods' buffers are broadcast from rank 0, and each
    replicated parameter's gradient is averaged over ``group`` by an all-reduce as soon as it is
    accumulated (every backward, gradient accumulation included).

    Then train as on one process: ``pm(**batch).loss.backward(); opt.step()`` with ``opt`` over
    ``pm.prompt_parameters()``; save with :func:`save_prompts` (on every rank).

    ``DistributedDataParallel(pm)`` may wrap the result (``transformers.Trainer`` / ``accelerate`` do
    so in a multi-process run): the base model's parameters and buffers are marked for DDP to ignore
    (it neither broadcasts nor reduces them; it could not broadcast a sharded weight), so DDP
    broadcasts and averages the replicated ones. Pass ``average_gradients=False`` then: DDP averages
    the gradients, and both together would reduce each gradient twice (with DDP's
    ``gradient_as_bucket_view=True``, two all-reduces on the same memory at once).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_base_model needs torch.distributed.init_process_group first")
    if any(isinstance(m, FSDPModule) for m in pm.modules()):
        raise ValueError("this PromptedModel is already sharded")
    if pm.info.layout.kind != "interface":
        raise NotImplementedError(
            f"{type(pm.model).__name__} takes its prompts through the key/value cache; shard_base_model "
            "supports models whose prompts go through transformers' attention interface"
        )
    replicated = replicated_parameters(pm)
    ids = {id(p) for p in replicated}
    ignored = {p for p in pm.model.parameters() if id(p) in ids}
    kw = dict(fsdp_kwargs, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    if mesh is not None:
        kw["mesh"] = mesh
    for layer in _layers(pm):
        fully_shard(layer, **kw)
    # The input embeddings in a unit of their own (unless tied to the output embeddings, which the
    # root then holds with them): a method that embeds other ids outside the model's forward then
    # works. (What the model's own lookup produced is kept for ctx.input_embeddings, so InfoPrompt's
    # auxiliary losses need no second lookup, tied or not.)
    emb = pm.info.input_embeddings
    out = pm.model.get_output_embeddings() if hasattr(pm.model, "get_output_embeddings") else None
    tied = out is not None and getattr(out, "weight", None) is getattr(emb, "weight", None)
    if not tied and any(True for _ in emb.parameters()) and not isinstance(emb, FSDPModule):
        fully_shard(emb, **kw)
    fully_shard(pm.model, **kw)

    if group is None and mesh is not None and mesh.ndim == 1:
        group = mesh.get_group()  # the prompts are replicated over the ranks the base model is sharded over
    world = dist.get_world_size(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in [*replicated, *pm.method.buffers(), *pm.prompt_sets.buffers()]:
            dist.broadcast(t.data, src=src, group=group)

    def average(p: torch.Tensor) -> None:
        # gloo has no ReduceOp.AVG: sum, then divide.
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        p.grad.div_(world)

    if average_gradients:
        for p in replicated:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(average)
    # DistributedDataParallel(pm) leaves these alone (names as pm.named_parameters() / named_buffers()).
    ignore = [f"model.{n}" for n, p in pm.model.named_parameters() if id(p) not in ids]
    ignore += [f"model.{n}" for n, _ in pm.model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pm, ignore)
    return pm


def save_prompts(pm, path, rank: int = 0, group=None) -> None:
    """``pm.save_prompts(path)`` for a PromptedModel sharded by :func:`shard_base_model`, written by one
    rank: a collective, to be called on every rank of ``group``; rank ``rank`` (of ``group``) writes
    the folder.

    Every rank builds what ``pm.save_prompts`` writes (``prompt_kernels.patch.io.prompt_files``: the
    sampled sharded weights of the fingerprint are gathered with ``full_tensor()``, classes named as
    before ``fully_shard``), then ``rank`` writes it and all wait for it. An unsharded ``pm`` is saved
    the same way (nothing to gather)."""
    from prompt_kernels.patch import io

    tensors, meta = io.prompt_files(pm)
    try:
        if dist.get_rank(group) == rank:
            io.write_prompt_files(path, tensors, meta)
    finally:
        dist.barrier(group=group)
