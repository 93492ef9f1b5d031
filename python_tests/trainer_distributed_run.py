"""Run by test_patch_trainer_distributed.py under ``torchrun`` / ``accelerate launch`` (2 CPU processes):
``transformers.Trainer`` on a PromptedModel (``python trainer_distributed_run.py CASE OUT [--fsdp]``;
``--fsdp``: the base model sharded with ``prompt_kernels.distributed.shard_base_model`` first).

Writes ``<out>/rank<r>.pt`` (the trained state, a frozen base weight, the world size and what Trainer
wrapped the model in) and the Trainer's own output (checkpoints, ``trainer_state.json``) in ``<out>``.
Without a launcher (one process) it runs the same training on the whole batches, for comparison.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from patch_helpers import tiny_model
from process_helpers import arm_hang_dump, finish_worker

import prompt_kernels as pk

GLOBAL_BATCH, STEPS = 4, 4


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, T=6, vocab=90, seed=0, lm=False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, T), generator=g)
        self.labels = self.ids.clone() if lm else self.ids[:, 0] % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


CASES = {
    # A causal LM: its loss takes Trainer's num_items_in_batch (the token count over all processes).
    "llama-prefix": ("llama", "lm", lambda: pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0)),
    "llama-prompt-tuning": ("llama", "lm", lambda: pk.PromptTuningConfig(prompt_length=3)),
    # A classifier with its head trained: its loss (a mean over the process's rows) ignores
    # num_items_in_batch, so average_tokens_across_devices=False (see the README's "Several GPUs").
    "bert-prefix-head": (
        "bert",
        "cls",
        lambda: pk.PrefixTuningConfig(prompt_length=3, prefix_dropout=0.0, trainable_head=True),
    ),
}


def build(case):
    model_type, head, config = CASES[case]
    model = tiny_model(model_type, head, seed=0, dropout=False)
    torch.manual_seed(1)
    return pk.attach(model, config())


def _full(t):
    """A copy of ``t``, gathered from its shards when FSDP sharded it (a collective: every rank calls it)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def main(case: str, out: str, fsdp: bool = False) -> None:
    from transformers import Trainer, TrainingArguments

    arm_hang_dump()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pm = build(case)
    lm = CASES[case][1] == "lm"
    frozen_name = next(n for n, p in pm.named_parameters() if "layer" in n and p.dim() == 2)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=4,
        train_sampling_strategy="sequential",  # the same global batches on 2 processes and on 1
        optim="sgd",  # plain SGD: a wrongly scaled gradient shows in the prompts (Adam would hide it)
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        max_steps=STEPS,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        average_tokens_across_devices=lm,
        disable_tqdm=True,
    )
    if fsdp and world > 1:
        # TrainingArguments started the process group. The base model sharded (FSDP2), the prompts
        # replicated; Trainer wraps pm in DistributedDataParallel, which averages their gradients.
        from prompt_kernels.distributed import shard_base_model

        shard_base_model(pm, average_gradients=False)
    trainer = Trainer(model=pm, args=args, train_dataset=Rows(lm=lm), eval_dataset=Rows(8, seed=1, lm=lm))
    trainer.train()
    metrics = trainer.evaluate()
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in pm.state_dict().items()},
            "frozen": _full(dict(pm.named_parameters())[frozen_name]),
            "sharded": type(dict(pm.named_parameters())[frozen_name]).__name__ == "DTensor",
            "frozen_name": frozen_name,
            "world_size": args.world_size,
            "wrapped": type(trainer.model_wrapped).__name__,
            "eval_loss": metrics["eval_loss"],
            "log_history": trainer.state.log_history,
        },
        os.path.join(out, f"rank{args.process_index}.pt"),
    )
    if world > 1:
        finish_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], fsdp="--fsdp" in sys.argv[3:])
