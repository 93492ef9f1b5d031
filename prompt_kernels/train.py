"""Training loop behind ``prompt-kernels train``: prompts + a linear head on a frozen model.

The base model (``AutoModel``: hidden states, no head) gets the method's prompts through
:func:`prompt_kernels.attach`; a linear classifier reads the mean of the real tokens' final hidden
states (encoders) or the last real token (causal LMs). Only the prompts and the head are trained and
saved: ``--out`` holds ``prompts.safetensors`` + ``config.json`` (from ``save_prompts``),
``head.safetensors``, ``optimizer.pt``, ``state.json`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LR = {
    "prompt-tuning": 3e-2,
    "prefix-tuning": 1e-2,
    "spt": 5e-3,
    "vip": 1e-2,
    "infoprompt": 3e-2,
    "gpc": 1e-2,
    "hiprompt": 5e-3,
}
CONFIG_NAMES = {
    "prompt-tuning": "PromptTuningConfig",
    "prefix-tuning": "PrefixTuningConfig",
    "spt": "SPTConfig",
    "vip": "VIPConfig",
    "infoprompt": "InfoPromptConfig",
    "gpc": "GPCConfig",
    "hiprompt": "HiPromptConfig",
}


def build_config(method: str, prompt_length: int):
    import prompt_kernels

    name = CONFIG_NAMES[method]
    cls = getattr(prompt_kernels, name, None)
    if cls is None and method == "spt":
        from prompt_kernels.methods.spt import SPTConfig as cls
    if cls is None:
        raise ValueError(f"--method {method}: {name} is not available in this build of prompt_kernels")
    return cls(prompt_length=prompt_length)


class Head(nn.Module):
    """Linear classifier over pooled final hidden states ``[B, T, d] -> [B, num_labels]``."""

    def __init__(self, hidden: int, num_labels: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.linear = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden[:, -mask.shape[1] :]  # input-style prompts sit in front of the tokens
        m = mask.to(hidden.dtype)
        if self.causal:
            last = (mask.long().cumsum(1) * mask.long()).argmax(1)  # the last real token
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:
            pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        return self.linear(pooled)


def _batches(n: int, batch_size: int, seed: int):
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield epoch, order[i : i + batch_size]
        epoch += 1


def _encode(tok, texts, max_length):
    return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _forward(pm, head, enc):
    out = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden, enc["attention_mask"])


@torch.no_grad()
def evaluate(pm, head, tok, texts, labels, max_length, batch_size=64) -> float:
    pm.eval()
    head.eval()
    correct = 0
    for i in range(0, len(texts), batch_size):
        enc = _encode(tok, texts[i : i + batch_size], max_length)
        pred = _forward(pm, head, enc).argmax(-1)
        correct += (pred == torch.tensor(labels[i : i + batch_size])).sum().item()
    pm.train()
    head.train()
    return correct / max(1, len(texts))


def run_training(args) -> dict:
    import safetensors.torch
    from tqdm.auto import tqdm

    import prompt_kernels
    from prompt_kernels.data import load_task
    from prompt_kernels.models import load_base_model, max_positions

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = load_task(args.task, seed=args.seed)
    model, tok, causal = load_base_model(args.model)
    limit = max_positions(model)
    if limit is not None and args.prompt_length + args.max_length > limit:
        raise ValueError(
            f"--prompt-length {args.prompt_length} plus --max-length {args.max_length} exceeds the model's "
            f"maximum of {limit} positions"
        )
    if args.resume:
        if not os.path.isdir(args.resume):
            raise FileNotFoundError(f"--resume: no such run folder: {args.resume}")
        pm = prompt_kernels.load_prompts(model, args.resume)
        saved_method = json.load(open(os.path.join(args.resume, "state.json")))["method"]
        if saved_method != args.method:
            raise ValueError(
                f"--resume: the run in {args.resume} used --method {saved_method}, not {args.method}"
            )
    else:
        pm = prompt_kernels.attach(model, build_config(args.method, args.prompt_length))
    head = Head(model.config.hidden_size, data.num_labels, causal)
    if hasattr(pm.method, "set_label_embeddings"):  # InfoPrompt's head loss reads the classifier rows
        pm.method.set_label_embeddings(lambda: head.linear.weight)
    params = [*pm.prompt_parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr or DEFAULT_LR[args.method], weight_decay=0.0)
    start = 0
    if args.resume:
        head.load_state_dict(safetensors.torch.load_file(os.path.join(args.resume, "head.safetensors")))
        opt.load_state_dict(torch.load(os.path.join(args.resume, "optimizer.pt"), weights_only=True))
        start = json.load(open(os.path.join(args.resume, "state.json")))["steps"]
    pm.train()
    batches = _batches(len(data.train_texts), args.batch_size, args.seed + start)
    t0 = time.perf_counter()
    seen = 0
    loop_steps = args.steps
    if args.method == "spt" and not args.resume:
        # SPT: gate search (half the steps), top-K layers, retraining of the discrete model (the rest);
        # --resume continues retraining the saved discrete model in the loop below.
        from prompt_kernels.methods.spt import cli_train

        pm, opt = cli_train(
            args, pm, head, tok, data, _encode, _forward, lr=args.lr or DEFAULT_LR[args.method]
        )
        loop_steps = 0
    bar = tqdm(range(start, start + loop_steps), disable=args.no_progress, desc=f"{args.method}", unit="step")
    for _step in bar:
        if hasattr(pm.method, "set_progress"):  # InfoPrompt's decay="linear"
            pm.method.set_progress(_step, start + args.steps)
        _, idx = next(batches)
        enc = _encode(tok, [data.train_texts[i] for i in idx], args.max_length)
        labels = torch.tensor([data.train_labels[i] for i in idx])
        logits = _forward(pm, head, enc)
        loss = F.cross_entropy(logits, labels)
        aux = getattr(pm, "last_aux_losses", None) or {}
        total = loss + sum(aux.values()) if aux else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        seen += len(idx)
        bar.set_postfix(loss=f"{loss.item():.3f}", ex_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
    train_seconds = time.perf_counter() - t0
    n_eval = min(len(data.test_texts), args.eval_size or len(data.test_texts))
    acc = evaluate(pm, head, tok, data.test_texts[:n_eval], data.test_labels[:n_eval], args.max_length)
    steps = start + args.steps
    os.makedirs(args.out, exist_ok=True)
    pm.save_prompts(args.out)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(args.out, "head.safetensors")
    )
    torch.save(opt.state_dict(), os.path.join(args.out, "optimizer.pt"))
    result = {
        "method": args.method,
        "accuracy": round(acc, 4),
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "trainable_parameters": int(pm.num_trainable_parameters + sum(p.numel() for p in head.parameters())),
    }
    with open(os.path.join(args.out, "state.json"), "w") as f:
        json.dump({"method": args.method, "steps": steps, "model": args.model, "task": args.task}, f)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({**result, "train_seconds": round(train_seconds, 2), "eval_examples": n_eval}, f, indent=1)
    return result
