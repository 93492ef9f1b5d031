"""``transformers.Trainer`` on a PromptedModel in 2 CPU processes (gloo), launched as a user launches it:
``torchrun --nproc_per_node 2`` and ``accelerate launch --multi_gpu --num_processes 2`` (the script is
``trainer_distributed_run.py``; Trainer wraps the PromptedModel in DistributedDataParallel), and with the
base model sharded by FSDP2 first (``prompt_kernels.distributed.shard_base_model``).

Both processes end with the same prompts, equal to a one-process Trainer run on the same global batches
(plain SGD, no clipping: a gradient not averaged, or scaled wrongly, shows); ``eval_loss`` is logged and
equals the one-process value; the checkpoints hold only the prompts (and the head when trained); the
frozen base model is unchanged.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from patch_helpers import one_thread, tiny_model  # noqa: F401  (autouse fixture)
from process_helpers import free_port, run_launcher
from trainer_distributed_run import build, main

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "trainer_distributed_run.py")
BIN = os.path.dirname(sys.executable)


def _run(make_cmd, out, case, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=HERE)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def command():  # per try: a fresh port, and nothing left by a hung try
        shutil.rmtree(out, ignore_errors=True)
        return [*make_cmd(), SCRIPT, case, str(out), *extra]

    run_launcher(command, out.parent / "logs", env, HERE)


LAUNCHERS = {
    "torchrun": lambda: [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"],
    "accelerate": lambda: [
        os.path.join(BIN, "accelerate"),
        "launch",
        "--multi_gpu",  # on a machine without GPUs: 2 CPU processes (TrainingArguments(use_cpu=True))
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ],
}


@pytest.mark.parametrize(
    "launcher, case, fsdp",
    [
        ("torchrun", "llama-prefix", False),
        ("accelerate", "llama-prompt-tuning", False),
        ("torchrun", "bert-prefix-head", False),
        ("torchrun", "llama-prefix", True),  # the base model sharded by FSDP2 (shard_base_model) first
    ],
)
def test_trainer_two_processes_match_one_process(launcher, case, fsdp, tmp_path):
    from safetensors.torch import load_file

    _run(LAUNCHERS[launcher], tmp_path / "ddp", case, *(["--fsdp"] if fsdp else []))
    main(case, str(tmp_path / "one"))  # the same run in this process, on the whole batches
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2))
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert (r0["world_size"], one["world_size"]) == (2, 1)
    assert r0["wrapped"] == "DistributedDataParallel"
    assert r0["sharded"] == r1["sharded"] == fsdp

    start = build(case).state_dict()
    assert set(r0["state"]) == set(start)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # replicas
        torch.testing.assert_close(v, one["state"][k], rtol=1e-4, atol=1e-6)  # = one process
        assert not torch.equal(v, start[k]), k  # it trained
    torch.testing.assert_close(r0["eval_loss"], one["eval_loss"], rtol=1e-5, atol=1e-6)
    # eval_loss at steps 2 and 4 and from the final evaluate(), and the training losses: as on one process
    for key, count in (("eval_loss", 3), ("loss", 4)):
        got, ref = ([h[key] for h in r["log_history"] if key in h] for r in (r0, one))
        assert len(got) == count
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)

    # The frozen base weight is the original.
    model_type, head = {"llama": ("llama", "lm"), "bert": ("bert", "cls")}[case.split("-")[0]]
    name = r0["frozen_name"]
    original = dict(tiny_model(model_type, head, seed=0).named_parameters())[name.removeprefix("model.")]
    assert torch.equal(r0["frozen"], original.detach())

    # Checkpoints: only the prompts (and the head when trained), never the base model.
    for step in (2, 4):
        saved = load_file(tmp_path / "ddp" / f"checkpoint-{step}" / "model.safetensors")
        assert set(saved) == set(start)
    saved = load_file(tmp_path / "ddp" / "checkpoint-4" / "model.safetensors")
    for k, v in saved.items():
        assert torch.equal(v, r0["state"][k]), k
