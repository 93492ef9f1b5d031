"""A PromptedModel under DistributedDataParallel: 2 CPU processes (gloo), a couple of training steps.

Each rank trains on its own batch; after every backward the prompt gradients must be identical on
both ranks and equal the mean of the single-process gradients of the two batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from patch_helpers import batch, tiny_model
from process_helpers import arm_hang_dump, finish_worker, spawn

import prompt_kernels as pk

WORLD, STEPS = 2, 2


def _config():
    return pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0)


def _loss(pm, ids, mask, labels):
    return pm(input_ids=ids, attention_mask=mask, labels=labels).loss


def _batches(rank, step):
    ids, mask = batch("bert", B=2, T=6, seed=10 * step + rank)
    return ids, mask, torch.tensor([rank, (rank + step) % 3])


def _worker(rank, port, out_path):
    arm_hang_dump()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = tiny_model("bert", "cls", seed=0, dropout=False)
        torch.manual_seed(1)
        pm = pk.attach(model, _config())
        ddp = torch.nn.parallel.DistributedDataParallel(pm)
        opt = torch.optim.SGD(pm.prompt_parameters(), lr=0.5)
        grads = []
        for step in range(STEPS):
            opt.zero_grad()
            _loss(ddp, *_batches(rank, step)).backward()
            g = pm.method.embedding.weight.grad.clone()
            grads.append(g)
            opt.step()
        torch.save(
            {"grads": grads, "final": pm.method.embedding.weight.detach().clone()}, f"{out_path}.{rank}"
        )
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()


def test_ddp_two_gloo_processes_same_gradients(tmp_path):
    out = str(tmp_path / "ddp")
    spawn(_worker, lambda port: (port, out), WORLD)
    results = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for step in range(STEPS):
        assert torch.equal(results[0]["grads"][step], results[1]["grads"][step])
    assert torch.equal(results[0]["final"], results[1]["final"])

    # Single process: the DDP gradient is the mean over the ranks' batches.
    model = tiny_model("bert", "cls", seed=0, dropout=False)
    torch.manual_seed(1)
    pm = pk.attach(model, _config())
    opt = torch.optim.SGD(pm.prompt_parameters(), lr=0.5)
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(_loss(pm, *_batches(r, step)) for r in range(WORLD)) / WORLD
        loss.backward()
        torch.testing.assert_close(
            results[0]["grads"][step], pm.method.embedding.weight.grad, rtol=1e-5, atol=1e-7
        )
        opt.step()
    torch.testing.assert_close(results[0]["final"], pm.method.embedding.weight.detach(), rtol=1e-5, atol=1e-6)
