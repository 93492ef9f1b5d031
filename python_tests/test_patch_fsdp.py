"""A PromptedModel under FSDP2 (``fully_shard``): 2 CPU processes (gloo), the frozen base model sharded,
the prompts replicated (``prompt_kernels.distributed``).

Each rank trains on its half of every global batch, starting from its own random prompts (the helper
broadcasts rank 0's). After every backward the prompt gradients must be identical on both ranks and
equal the single-process gradient of the whole batch; the trained prompts likewise; a frozen base
weight is sharded and unchanged; the prompts saved (collectively, written by rank 0) load onto an
unsharded model and give the outputs of the sharded one. The plain ``pm.save_prompts``, called on every
rank of the sharded model, writes the same folder (classes named as before ``fully_shard``, sampled
weights gathered), and the saved prompts' fingerprint matches the sharded model itself (a prompt set
loaded onto it from the folder gives its outputs).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from patch_helpers import batch, one_thread, tiny_model  # noqa: F401  (autouse fixture)
from process_helpers import arm_hang_dump, finish_worker, spawn
from safetensors.torch import load_file

import prompt_kernels as pk
from prompt_kernels import distributed as pkd
from prompt_kernels.patch import io

WORLD, STEPS, B = 2, 3, 4
CASES = {
    "llama-prefix": ("llama", "lm", lambda: pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0)),
    "llama-prompt-tuning": ("llama", "lm", lambda: pk.PromptTuningConfig(prompt_length=3)),
    # hidden-space prompts through each layer's own (sharded, frozen) key/value projections
    "llama-spt": ("llama", "lm", lambda: pk.SPTConfig(prompt_length=3)),
    # auxiliary losses that embed the input ids after the model's forward (the embeddings' own FSDP unit);
    # on a causal LM (no class labels) InfoPrompt has its representation loss only
    "llama-infoprompt": ("llama", "lm", lambda: pk.InfoPromptConfig(prompt_length=3)),
    # the same with the input embeddings tied to the output layer (no FSDP unit of their own): the
    # embeddings of the model's own lookup are kept for the auxiliary losses, no second lookup
    "llama-infoprompt-tied": ("llama", "lm", lambda: pk.InfoPromptConfig(prompt_length=3)),
    "bert-prefix-head": (
        "bert",
        "cls",
        lambda: pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0, trainable_head=True),
    ),
}


def _global_batch(case, step):
    """The whole batch of ``step``: ``B`` rows (the classifier's last row padded; the LM's rows unpadded,
    so each rank's token-mean loss averages to the whole batch's)."""
    model_type, head, _ = CASES[case]
    ids, mask = batch(model_type, B=B, T=6, pad_last=2 if head == "cls" else 0, seed=100 + step)
    labels = torch.arange(step, step + B) % 3 if head == "cls" else ids
    return ids, mask, labels


# InfoPrompt's auxiliary losses contrast each row with the other rows of its batch: data-parallel
# training optimises the mean of the ranks' losses, which the one-process run computes half by half.
PER_RANK_LOSS = {"llama-infoprompt", "llama-infoprompt-tied"}
# add_prompt_set takes prompts only (no trained head) of methods that are not sequence-style.
PROMPT_SET_CASES = {"llama-prefix", "llama-prompt-tuning", "llama-infoprompt"}


def _tiny(case, **kwargs):
    model_type, head, _ = CASES[case]
    return tiny_model(model_type, head, seed=0, tie_word_embeddings=case.endswith("-tied"), **kwargs)


def _rows(rank):
    return slice(rank * B // WORLD, (rank + 1) * B // WORLD)


def _loss(pm, ids, mask, labels):
    return pm(input_ids=ids, attention_mask=mask, labels=labels).loss


def _eval_batch(case):
    return batch(CASES[case][0], B=3, T=5, seed=7)


def _build(case, prompt_seed):
    config = CASES[case][2]
    model = _tiny(case, dropout=False)
    torch.manual_seed(prompt_seed)
    return pk.attach(model, config())


def _trainables(pm):
    return list(pm.prompt_parameters())


def _frozen_name(pm):
    return next(n for n, p in pm.model.named_parameters() if "layer" in n and p.dim() == 2)


def _worker(rank, port, case, out):
    from torch.distributed.tensor import DTensor

    arm_hang_dump()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pm = _build(case, prompt_seed=100 + rank)  # different random prompts per rank: rank 0's are broadcast
        name = _frozen_name(pm)
        pkd.shard_base_model(pm)
        frozen = dict(pm.model.named_parameters())[name]
        assert isinstance(frozen, DTensor) and frozen.to_local().shape[0] < frozen.shape[0], name
        assert not any(isinstance(p, DTensor) for p in _trainables(pm))  # replicated, plain tensors
        init = [p.detach().clone() for p in _trainables(pm)]
        opt = torch.optim.SGD(_trainables(pm), lr=0.5)
        grads = []
        for step in range(STEPS):
            opt.zero_grad()
            _loss(pm, *(t[_rows(rank)] for t in _global_batch(case, step))).backward()
            grads.append([p.grad.clone() for p in _trainables(pm)])
            opt.step()
        pm.eval()
        ids, mask = _eval_batch(case)
        with torch.no_grad():
            logits = pm(input_ids=ids, attention_mask=mask).logits
        pkd.save_prompts(pm, f"{out}/prompts")
        pm.save_prompts(f"{out}/plain{rank}")  # every rank: the sampled sharded weights are gathered
        # Loading onto the sharded model: its fingerprint matches the saved one (what load_prompts and
        # add_prompt_set check), and a prompt set loaded from the folder gives the default set's outputs.
        with open(f"{out}/prompts/{io.CONFIG_FILE}") as f:
            saved = json.load(f)["base_model"]
        now = io.fingerprint(pm.model, pm.info, like=saved)
        same = io.compare_fingerprints(saved, now, head_saved=True) == ([], False)
        set_logits = None
        if case in PROMPT_SET_CASES:
            pm.add_prompt_set("saved", f"{out}/prompts")
            with torch.no_grad():
                set_logits = pm(input_ids=ids, attention_mask=mask, prompt_set="saved").logits
        torch.save(
            {
                "init": init,
                "grads": grads,
                "final": [p.detach().clone() for p in _trainables(pm)],
                "frozen": frozen.full_tensor().detach().clone(),
                "frozen_name": name,
                "logits": logits,
                "fingerprint_matches": same,
                "set_logits": set_logits,
            },
            f"{out}/rank{rank}.pt",
        )
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()


@pytest.mark.filterwarnings("ignore:InfoPrompt. a training forward without class labels")
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_sharded_base_replicated_prompts_match_one_process(case, tmp_path):
    spawn(_worker, lambda port: (port, case, str(tmp_path)), WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    # Replicas: the same start (rank 0's), the same averaged gradients, the same prompts.
    for a, b in zip(r0["init"], r1["init"]):
        assert torch.equal(a, b)
    for step in range(STEPS):
        for a, b in zip(r0["grads"][step], r1["grads"][step]):
            assert torch.equal(a, b)
    for a, b in zip(r0["final"], r1["final"]):
        assert torch.equal(a, b)

    # One process on the whole batches, from rank 0's initial prompts: the same gradients and prompts.
    pm = _build(case, prompt_seed=100)
    for a, p in zip(r0["init"], _trainables(pm)):
        assert torch.equal(a, p)
    opt = torch.optim.SGD(_trainables(pm), lr=0.5)
    for step in range(STEPS):
        opt.zero_grad()
        whole = _global_batch(case, step)
        if case in PER_RANK_LOSS:
            loss = sum(_loss(pm, *(t[_rows(r)] for t in whole)) for r in range(WORLD)) / WORLD
        else:
            loss = _loss(pm, *whole)
        loss.backward()
        for got, p in zip(r0["grads"][step], _trainables(pm)):
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
        opt.step()
    for got, start, p in zip(r0["final"], r0["init"], _trainables(pm)):
        torch.testing.assert_close(got, p.detach(), rtol=1e-4, atol=1e-6)
        assert not torch.equal(got, start)  # it trained

    # The frozen base weight, gathered from its shards, is the untouched original.
    original = dict(_tiny(case).named_parameters())[r0["frozen_name"]]
    assert torch.equal(r0["frozen"], original.detach()) and torch.equal(r1["frozen"], original.detach())

    # The prompts rank 0 saved load onto an unsharded model and give the sharded model's outputs.
    fresh = _tiny(case, dropout=False)
    loaded = pk.load_prompts(fresh, tmp_path / "prompts").eval()
    ids, mask = _eval_batch(case)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
        ref = pm.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, r0["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1["logits"], r0["logits"], rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    # pm.save_prompts on the sharded model (every rank) wrote what distributed.save_prompts wrote.
    written = json.loads((tmp_path / "prompts" / io.CONFIG_FILE).read_text())
    assert written["base_model"]["model_class"] == type(fresh).__name__
    assert not written["base_model"]["model_class"].startswith("FSDP")
    weights = load_file(tmp_path / "prompts" / io.WEIGHTS_FILE)
    for rank in range(WORLD):
        plain = tmp_path / f"plain{rank}"
        assert json.loads((plain / io.CONFIG_FILE).read_text()) == written
        again = load_file(plain / io.WEIGHTS_FILE)
        assert again.keys() == weights.keys()
        assert all(torch.equal(again[k], v) for k, v in weights.items())
    assert r0["fingerprint_matches"] and r1["fingerprint_matches"]
    if case in PROMPT_SET_CASES:
        torch.testing.assert_close(r0["set_logits"], r0["logits"], rtol=0, atol=0)
