"""A PromptedModel inside ``transformers.Trainer``, as a PEFT user runs it: training, evaluation with
``eval_loss`` and ``compute_metrics`` (no ``label_names`` needed), checkpoints that hold only the prompts,
``resume_from_checkpoint``, ``load_best_model_at_end``; ``save_pretrained`` / ``from_pretrained``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from patch_helpers import one_thread, tiny_model  # noqa: F401  (autouse fixture)

import prompt_kernels as pk


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, T=6, vocab=90, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, T), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def _trainer(pm, out_dir, calls, **overrides):
    from transformers import Trainer, TrainingArguments

    def metrics(pred):
        calls.append(1)
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        logging_steps=3,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    args.update(overrides)
    return Trainer(
        model=pm,
        args=TrainingArguments(**args),
        train_dataset=_Rows(),
        eval_dataset=_Rows(8, seed=1),
        compute_metrics=metrics,
    )


def test_trainer_evaluates_checkpoints_prompts_only_and_resumes(tmp_path):
    model = tiny_model("bert", "cls")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3, trainable_head=True))
    calls = []
    trainer = _trainer(
        pm, tmp_path / "run", calls, load_best_model_at_end=True, metric_for_best_model="accuracy"
    )
    trainer.train()
    assert calls, "compute_metrics was never called"
    logged = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert logged and all("eval_accuracy" in h for h in logged)
    assert trainer.state.best_model_checkpoint is not None
    ckpt = tmp_path / "run" / "checkpoint-3"
    weights = [f for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(ckpt / f) for f in weights)
    prompt_bytes = sum(v.numel() * v.element_size() for v in pm.state_dict().values())
    assert size < 2 * prompt_bytes + 100_000, (weights, size, prompt_bytes)  # never the base model
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    assert set(saved) == set(pm.state_dict())
    # Resume from the first checkpoint: the prompts after 6 steps equal the uninterrupted run's.
    final = {k: v.clone() for k, v in pm.state_dict().items()}
    model2 = tiny_model("bert", "cls")
    pm2 = pk.attach(model2, pk.PrefixTuningConfig(prompt_length=3, trainable_head=True))
    trainer2 = _trainer(
        pm2, tmp_path / "run", [], load_best_model_at_end=True, metric_for_best_model="accuracy"
    )
    trainer2.train(resume_from_checkpoint=str(ckpt))
    for k, v in pm2.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6)


def test_save_pretrained_from_pretrained_and_peft_calls_we_do_not_offer(tmp_path, capsys):
    model = tiny_model("llama", "lm")
    pm = pk.attach(model, pk.PrefixTuningConfig(prompt_length=3))
    with torch.no_grad():
        pm.method.embedding.weight.normal_()
    ids = torch.randint(5, 90, (2, 6))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["config.json", "prompts.safetensors"]
    pm.print_trainable_parameters()
    # p 3 x 2 layers x (key, value) x 2 key/value heads x head size 8
    assert capsys.readouterr().out.startswith("trainable params: 192 || all params: ")
    pm2 = pk.PromptedModel.from_pretrained(pm.detach(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(pm2(input_ids=ids).logits, ref, rtol=0, atol=0)
    for name in ("merge_and_unload", "set_adapter", "disable_adapter", "get_base_model"):
        with pytest.raises(NotImplementedError, match=name):
            getattr(pm2, name)
        assert not hasattr(pm2, name)
