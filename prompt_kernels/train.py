"""Training loop behind ``prompt-kernels train`` (prompts + a linear head on a frozen model) and
``prompt-kernels predict``.

The base model (``AutoModel``: hidden states, no head) gets the method's prompts through
:func:`prompt_kernels.attach`; a linear classifier reads the mean of the real tokens' final hidden
states (encoders) or the last real token (causal LMs). Only the prompts and the head are trained and
saved.

The run folder (``--out``) is a checkpoint, rewritten every ``--save-every`` steps, on SIGINT/SIGTERM
(after the step in flight) and at the end:

- ``prompts.safetensors`` + ``config.json`` (from ``save_prompts``; ``load_prompts`` reads them),
- ``head.safetensors``, ``optimizer.pt`` (AdamW state),
- ``rng_state.pt``: the torch (CPU and CUDA), Python and NumPy generators and the data order's position,
- ``state.json``: steps done and planned, whether the run is complete, the settings it was started
  with, the label names (class id ``i`` is ``label_names[i]``), the pooling,
- ``--method spt``: ``spt_search.json`` (the search record) and, in ``state.json``, the phase: during
  the gate search (the first half of the steps) the checkpoint holds the super-network (gates and
  generators), both search optimisers and the D1/D2 batch order, so an interrupted search resumes
  mid-search; then the discrete model of the top-K layers is retrained as the other methods train,
- ``metrics.json`` once the run is complete and evaluated.

A checkpoint is written whole into ``--out/.staging/``, marked complete, then its files are moved into
place with ``os.replace``; a crash before the mark leaves the previous checkpoint untouched, a crash
after it is finished by the next reader (``checkpoint_files.recover_checkpoint``). ``--resume DIR`` restores all of
it, so an interrupted run resumed ends bit for bit where the uninterrupted run would have (on the same
machine and thread count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from prompt_kernels.batch_order import SeededEpochs
from prompt_kernels.checkpoint_files import recover_checkpoint, write_checkpoint

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
# Defaults of the arguments a resumed run takes from its folder (the command line leaves them None).
DEFAULTS = {
    "method": "prefix-tuning",
    "model": "minilm",
    "task": "mr",
    "steps": 300,
    "batch_size": 32,
    "prompt_length": 10,
    "max_length": 64,
    "seed": 0,
    "lr": None,  # per method: DEFAULT_LR
}
DEFAULT_OUT = "runs/latest"
DEFAULT_SAVE_EVERY = 50
SETTINGS = ("method", "model", "task", "prompt_length", "batch_size", "max_length", "seed", "lr")

STATE_FILE = "state.json"
HEAD_FILE = "head.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
METRICS_FILE = "metrics.json"
SPT_SEARCH_FILE = "spt_search.json"  # prompt_kernels.methods.spt.SEARCH_FILE


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


class BatchOrder(SeededEpochs):
    """Seeded epochs of shuffled row indices, cut into batches (a short last batch is dropped; with fewer
    rows than ``batch_size`` every batch is all rows). Its position and generator state are part of the
    checkpoint, so a resumed run sees the batches the uninterrupted run would have seen."""

    def _new_epoch(self, order: list[int]) -> None:
        self._order = order

    def _starts(self) -> range:
        return range(0, self.n - self.batch_size + 1 if self.n >= self.batch_size else 1, self.batch_size)

    def _num_batches(self) -> int:
        return len(self._starts())

    def _batch(self, i: int) -> list[int]:
        start = self._starts()[i]
        return self._order[start : start + self.batch_size]


def _encode(tok, texts, max_length):
    return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _forward(pm, head, enc):
    out = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden, enc["attention_mask"])


@torch.no_grad()
def _logits(pm, head, tok, texts, max_length, batch_size=64) -> torch.Tensor:
    pm.eval()
    head.eval()
    try:
        parts = [
            _forward(pm, head, _encode(tok, texts[i : i + batch_size], max_length)).float()
            for i in range(0, len(texts), batch_size)
        ]
    finally:
        pm.train()
        head.train()
    return torch.cat(parts) if parts else torch.zeros(0, head.linear.out_features)


def evaluate(pm, head, tok, texts, labels, max_length, batch_size=64) -> float:
    pred = _logits(pm, head, tok, texts, max_length, batch_size).argmax(-1)
    return (pred == torch.tensor(labels, dtype=torch.long)).sum().item() / max(1, len(texts))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _rng_state() -> dict:
    import numpy as np

    # the global NumPy generator: the one libraries draw from
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: str, what: str, loader):
    """``loader(path)``, with a ValueError naming the file when it is unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} is missing")
    try:
        return loader(path)
    except Exception as exc:
        raise ValueError(
            f"{what}: {path} is not readable ({type(exc).__name__}: {exc}); the file is truncated or corrupted"
        ) from exc


def _load_into(obj, path: str, loader, flag: str = "--resume") -> None:
    """``obj.load_state_dict(loader(path))`` with errors that name the file."""
    sd = _load(path, flag, loader)
    try:
        obj.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"{flag}: {path} does not fit this run ({exc})") from exc


def _read_state(folder: str, flag: str) -> dict:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{flag}: {folder} holds no {STATE_FILE}: not a folder written by prompt-kernels train"
        )
    state = _load(path, flag, lambda p: json.load(open(p)))
    if not isinstance(state, dict) or "steps" not in state:
        raise ValueError(f"{flag}: {path} is not a prompt-kernels run state")
    return state


def _saved_settings(folder: str, state: dict) -> dict:
    """The settings a run was started with; runs written before they were saved give what they kept."""
    settings = dict(state.get("settings") or {})
    for key in ("method", "model", "task"):
        settings.setdefault(key, state.get(key))
    if settings.get("prompt_length") is None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(os.path.join(folder, "config.json")) as f:
                settings["prompt_length"] = json.load(f)["prompt_config"]["prompt_length"]
    return settings


def _normalise(key: str, value):
    if key in ("model", "task") and isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    if key == "lr" and value is not None:
        return float(value)
    return value


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_options(args) -> argparse.Namespace:
    """The run's settings: for a fresh run the arguments or their defaults; for ``--resume`` the saved
    ones, refusing any argument given with a different value (ValueError naming it)."""
    o = argparse.Namespace(**vars(args))
    o.resume = getattr(args, "resume", None)
    o.no_progress = bool(getattr(args, "no_progress", False))
    o.eval_size = getattr(args, "eval_size", None)
    save_every = getattr(args, "save_every", None)
    o.save_every = DEFAULT_SAVE_EVERY if save_every is None else save_every
    o.state = None
    if not o.resume:
        for key, default in DEFAULTS.items():
            if getattr(o, key, None) is None:
                setattr(o, key, default)
        o.out = getattr(args, "out", None) or DEFAULT_OUT
        o.lr = o.lr or DEFAULT_LR[o.method]
        return o
    if not os.path.isdir(o.resume):
        raise FileNotFoundError(f"--resume: no such run folder: {o.resume}")
    recover_checkpoint(o.resume)
    state = o.state = _read_state(o.resume, "--resume")
    saved = _saved_settings(o.resume, state)
    conflicts = []
    for key in SETTINGS:
        given, kept = getattr(args, key, None), saved.get(key)
        if given is not None and kept is not None and _normalise(key, given) != _normalise(key, kept):
            conflicts.append(
                f"{_flag(key)} {given} conflicts with the run in {o.resume}, which used {_flag(key)} {kept}"
            )
        setattr(o, key, kept if kept is not None else given if given is not None else DEFAULTS[key])
    complete = state.get("complete", True)
    steps = getattr(args, "steps", None)
    if not complete and steps is not None and steps != state.get("total_steps"):
        conflicts.append(
            f"--steps {steps} conflicts with the run in {o.resume}, which was interrupted after step "
            f"{state['steps']} of its --steps {state.get('total_steps')}; resume without --steps to finish it, "
            "then resume the finished run with --steps N to train N more"
        )
    if conflicts:
        raise ValueError(
            "--resume: "
            + "; ".join(conflicts)
            + " (a resumed run keeps the settings it started with: leave these arguments out, or start a "
            "new run with another --out)"
        )
    o.lr = o.lr or DEFAULT_LR[o.method]
    o.out = getattr(args, "out", None) or o.resume
    done = int(state["steps"])
    planned = int(state.get("total_steps", done))
    o.steps = planned - done if not complete else (getattr(args, "steps", None) or 0)
    return o


# -- progress ---------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe, CI) about ten plain lines per run, or one
    a minute, instead of a bar redrawn with carriage returns."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.tty = _stderr_is_tty()
        self.bar = None
        if enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr)
        self.every = max(1, math.ceil((total - initial) / 10))
        self.t0 = self.last = time.perf_counter()
        self.start, self.examples = initial, 0

    def update(self, step: int, loss: float, examples: int) -> None:
        self.examples += examples
        rate = self.examples / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", ex_per_s=f"{rate:.0f}")
        elif self.enabled:
            now = time.perf_counter()
            if (step - self.start) % self.every == 0 or step == self.total or now - self.last > 60:
                self.last = now
                print(
                    f"prompt-kernels: {self.desc} step {step}/{self.total} loss {loss:.4f} {rate:.0f} ex/s",
                    file=sys.stderr,
                    flush=True,
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_hf_bars(quiet: bool):
    """transformers' own bars ("Loading weights") off when stderr is not a terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


# -- interruption -----------------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the checkpoint after ``step`` is saved in ``out``."""

    def __init__(self, signum: int, step: int, total: int, out: str):
        self.signum, self.step, self.total, self.out = signum, step, total, out
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted after step {step} of {total} ({name}); the checkpoint is saved in {out}; "
            f"continue with: prompt-kernels train --resume {out}"
        )


class _Signals:
    """Within the block, SIGINT and SIGTERM only set ``signum``: the loop finishes the step in flight,
    saves and stops. A second signal acts at once (the default action: KeyboardInterrupt or exit)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now (the last checkpoint is whole)
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        with contextlib.suppress(RuntimeError, OSError):  # a print interrupted by this handler
            print(
                f"\nprompt-kernels: {signal.Signals(signum).name}: saving a checkpoint after this step "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # ignored (a `cmd &` job's SIGINT): stays so
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False


# -- train ------------------------------------------------------------------------------------------
def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def run_training(args) -> dict:
    o = resolve_options(args)
    with _quiet_hf_bars(not _stderr_is_tty()):
        return _train(o)


def _train(o) -> dict:
    import safetensors.torch

    import prompt_kernels
    from prompt_kernels.data import load_task, split_warnings
    from prompt_kernels.models import load_base_model, max_positions

    resume, state = o.resume, o.state
    torch.manual_seed(o.seed)
    random.seed(o.seed)
    data = load_task(o.task, seed=o.seed)
    if resume and state.get("label_names") is not None and state["label_names"] != data.label_names:
        saved, now = state["label_names"], data.label_names
        raise ValueError(
            f"--task: the run in {resume} was trained on {len(saved)} labels {saved}; {o.task} now has "
            f"{len(now)} labels {now}"
        )
    n_eval = min(len(data.test_texts), o.eval_size or len(data.test_texts))
    for message in split_warnings(data, n_eval):
        _warn(message)
    model, tok, causal = load_base_model(o.model)
    limit = max_positions(model)
    if limit is not None and o.prompt_length + o.max_length > limit:
        raise ValueError(
            f"--prompt-length {o.prompt_length} plus --max-length {o.max_length} exceeds the model's "
            f"maximum of {limit} positions"
        )
    if resume:
        pm = prompt_kernels.load_prompts(model, resume)
    else:
        _check_fresh_out(o.out)
        pm = prompt_kernels.attach(model, build_config(o.method, o.prompt_length))
    head = Head(model.config.hidden_size, data.num_labels, causal)
    if hasattr(pm.method, "set_label_embeddings"):  # InfoPrompt's head loss reads the classifier rows
        pm.method.set_label_embeddings(lambda: head.linear.weight)
    params = [*pm.prompt_parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.0)
    order = BatchOrder(len(data.train_texts), o.batch_size, o.seed)
    done = 0
    # SPT: the gate search (the first half of the steps), the top-K layers, then the discrete model
    # retrained in the loop below. ``search`` is None once the search is over (or for other methods).
    search = _SPTSearch.start(o, pm, head, tok, data) if o.method == "spt" and not resume else None
    if resume and o.method == "spt" and (state.get("spt") or {}).get("phase") == "search":
        search = _SPTSearch.resume(o, pm, head, tok, data, resume, state)
    if resume:
        done = int(state["steps"])
        _load_into(head, os.path.join(resume, HEAD_FILE), safetensors.torch.load_file)
        if search is not None:
            search.load_optimizers(os.path.join(resume, OPTIMIZER_FILE))
        else:
            _load_into(opt, os.path.join(resume, OPTIMIZER_FILE), lambda p: torch.load(p, weights_only=True))
        rng_path = os.path.join(resume, RNG_FILE)
        if os.path.exists(rng_path):
            rng = _load(rng_path, "--resume", lambda p: torch.load(p, weights_only=True))
            try:
                (search.halves if search is not None else order).load_state_dict(rng["data"])
            except ValueError as exc:
                raise ValueError(
                    f"--task: {o.task} changed since the run in {resume} started: {exc}"
                ) from exc
            _set_rng_state(rng)
        else:  # a run folder written before checkpoints: a fresh order, as those runs resumed
            order = BatchOrder(len(data.train_texts), o.batch_size, o.seed + done)
    target = done + o.steps
    # What the search decided (spt_search.json), rewritten with every checkpoint of an SPT run.
    record = search.record if search is not None else _saved_search_record(o, resume)
    data_order = search.halves if search is not None else order  # the order whose position is saved
    pm.train()

    def save(step: int, complete: bool) -> None:
        settings = {k: getattr(o, k) for k in SETTINGS}
        settings["model"], settings["task"] = _normalise("model", o.model), _normalise("task", o.task)
        run_state = {
            "method": o.method,
            "steps": step,
            "total_steps": target,
            "complete": complete,
            "model": settings["model"],
            "task": settings["task"],
            "settings": settings,
            "label_names": data.label_names,
            "num_labels": data.num_labels,
            "causal": causal,
            "data_position": {"epoch": data_order.epoch, "batch": data_order.batch},
            "train_rows": len(data.train_texts),
            "test_rows": len(data.test_texts),
        }
        head_sd = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        opt_sd = search.optimizer_state() if search is not None else opt.state_dict()
        rng = {**_rng_state(), "data": data_order.state_dict()}
        writers = {
            "prompts.safetensors": lambda p: pm.save_prompts(os.path.dirname(p)),  # + config.json
            HEAD_FILE: lambda p: safetensors.torch.save_file(head_sd, p),
            OPTIMIZER_FILE: lambda p: torch.save(opt_sd, p),
            RNG_FILE: lambda p: torch.save(rng, p),
        }
        if record is not None:  # SPT
            run_state["spt"] = {
                "phase": "search" if search is not None else "retrain",
                "search_steps": record.search_steps if search is None else search.steps,
            }
            if search is None:
                record.retrain_steps = step - record.search_steps
            search_json = record.to_dict()
            writers[SPT_SEARCH_FILE] = lambda p: _write_json(p, search_json)
        writers[STATE_FILE] = lambda p: _write_json(p, run_state)  # last: moved into place last
        write_checkpoint(o.out, writers, remove=() if complete else (METRICS_FILE,))

    t0 = time.perf_counter()
    progress = Progress(target, done, o.method, enabled=not o.no_progress)
    try:
        with _Signals() as signals:

            def checkpoint(step: int, loss: float, examples: int) -> None:
                """After each step: progress, then the checkpoint of an interruption or --save-every."""
                progress.update(step, loss, examples)
                if signals.signum is not None:
                    save(step, complete=step == target)
                    raise TrainingInterrupted(signals.signum, step, target, o.out)
                if o.save_every and step % o.save_every == 0 and step < target:
                    save(step, complete=False)

            if search is not None:
                done = search.run(done, checkpoint)
                # The discrete model of the top-K layers, retrained in the loop below (its batches are
                # those of spt.cli_train's retraining: a BatchOrder seeded with seed + 1).
                pm, opt = search.discrete_model(o.lr)
                order = BatchOrder(len(data.train_texts), o.batch_size, o.seed + 1)
                search = None
                pm.train()
            data_order = order
            for step in range(done, target):
                if hasattr(pm.method, "set_progress"):  # InfoPrompt's decay="linear"
                    pm.method.set_progress(step, target)
                idx = order.next()
                enc = _encode(tok, [data.train_texts[i] for i in idx], o.max_length)
                labels = torch.tensor([data.train_labels[i] for i in idx])
                if hasattr(pm.method, "set_labels"):  # InfoPrompt's head loss needs the gold labels
                    pm.method.set_labels(labels)
                logits = _forward(pm, head, enc)
                loss = F.cross_entropy(logits, labels)
                aux = getattr(pm, "last_aux_losses", None) or {}
                total = loss + sum(aux.values()) if aux else loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                done = step + 1
                checkpoint(done, loss.item(), len(idx))
            save(done, complete=True)
            if signals.signum is not None:
                raise TrainingInterrupted(signals.signum, done, target, o.out)
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t0
    acc = evaluate(pm, head, tok, data.test_texts[:n_eval], data.test_labels[:n_eval], o.max_length)
    result = {
        "method": o.method,
        "accuracy": round(acc, 4),
        "steps": target,
        "seconds": round(time.perf_counter() - t0, 2),
        "trainable_parameters": int(pm.num_trainable_parameters + sum(p.numel() for p in head.parameters())),
        "eval_examples": n_eval,
    }
    metrics = {**result, "train_seconds": round(train_seconds, 2)}
    tmp = os.path.join(o.out, METRICS_FILE + ".tmp")
    _write_json(tmp, metrics)
    os.replace(tmp, os.path.join(o.out, METRICS_FILE))
    return result


class _SPTSearch:
    """The gate search of ``--method spt`` (the first ``max(1, steps // 2)`` steps; the pipeline of
    ``spt.cli_train``), checkpointed as the training loop is: its checkpoint holds the super-network's
    prompts (generators and gates), the head, both optimisers (``optimizer.pt``: ``{"spt_search":
    {"omega": ..., "alpha": ...}}``), the search record (``spt_search.json``), the D1/D2 batch order
    (``spt.EpochHalves``, in ``rng_state.pt``) and the generators; ``state.json`` says
    ``"spt": {"phase": "search", "search_steps": S}``."""

    def __init__(self, o, pm, head, tok, data, steps: int, record):
        from prompt_kernels.methods import spt

        self.spt, self.o, self.pm, self.head, self.tok, self.data = spt, o, pm, head, tok, data
        self.steps, self.record = steps, record
        self.halves = spt.EpochHalves(len(data.train_texts), o.batch_size, o.seed)
        config = pm.method.config
        gate_lr = record.gate_lr
        if gate_lr is None:
            gate_lr = spt.gate_learning_rate(config, steps - spt.warmup_steps(config, steps))
        self.optimizers = spt.search_optimizers(pm, head, o.lr, gate_lr)

    @classmethod
    def start(cls, o, pm, head, tok, data) -> _SPTSearch:
        from prompt_kernels.methods.spt import SearchRecord

        return cls(o, pm, head, tok, data, max(1, o.steps // 2), SearchRecord())

    @classmethod
    def resume(cls, o, pm, head, tok, data, folder: str, state: dict) -> _SPTSearch:
        from prompt_kernels.methods.spt import SearchRecord

        path = os.path.join(folder, SPT_SEARCH_FILE)
        record = _load(path, "--resume", lambda p: SearchRecord(**json.load(open(p))))
        return cls(o, pm, head, tok, data, int(state["spt"]["search_steps"]), record)

    def optimizer_state(self) -> dict:
        opt_w, opt_a = self.optimizers
        return {"spt_search": {"omega": opt_w.state_dict(), "alpha": opt_a.state_dict()}}

    def load_optimizers(self, path: str) -> None:
        sd = _load(path, "--resume", lambda p: torch.load(p, weights_only=True))
        try:
            for opt, key in zip(self.optimizers, ("omega", "alpha")):
                opt.load_state_dict(sd["spt_search"][key])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--resume: {path} does not fit this run's SPT search ({exc!r})") from exc

    def run(self, done: int, checkpoint) -> int:
        """The search steps ``done .. steps - 1``; ``checkpoint(steps_done, loss, examples)`` after each
        (progress, interruption, ``--save-every``). Returns the steps done."""
        o, data = self.o, self.data

        def loss_fn(pm_, head_, idx):
            enc = _encode(self.tok, [data.train_texts[i] for i in idx], o.max_length)
            labels = torch.tensor([data.train_labels[i] for i in idx])
            return F.cross_entropy(_forward(pm_, head_, enc), labels)

        examples = min(o.batch_size, len(data.train_texts) // 2)

        def progress(step, loss_w, loss_a):
            checkpoint(step + 1, loss_w, examples)

        self.spt.search(
            self.pm,
            self.head,
            self.halves,
            None,
            self.steps,
            loss_fn,
            lr=o.lr,
            record=self.record,
            progress=progress,
            optimizers=self.optimizers,
            start=done,
        )
        return max(done, self.steps)

    def discrete_model(self, lr: float):
        """The top-K layers (recorded), the discrete model (``spt.build_discrete``) and the AdamW over
        its prompts and the head that retrains it."""
        spt, record = self.spt, self.record
        record.selected_layers = spt.select_layers(self.pm)
        record.retrain_from = self.pm.prompt_config.retrain_from
        pm = spt.build_discrete(self.pm, record.selected_layers)
        params = [*pm.prompt_parameters(), *self.head.parameters()]
        return pm, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _saved_search_record(o, folder):
    """The SPT search record of the run being resumed (None: another method, or a run without one)."""
    if o.method != "spt" or not folder or not os.path.isfile(os.path.join(folder, SPT_SEARCH_FILE)):
        return None
    from prompt_kernels.methods.spt import SearchRecord

    path = os.path.join(folder, SPT_SEARCH_FILE)
    return _load(path, "--resume", lambda p: SearchRecord(**json.load(open(p))))


def _check_fresh_out(out: str) -> None:
    """A new run in a folder that holds an interrupted one overwrites it: say so."""
    path = os.path.join(out, STATE_FILE)
    if not os.path.isfile(path):
        return
    recover_checkpoint(out)
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            state = json.load(f)
        if state.get("complete") is False:
            _warn(
                f"--out {out} holds a run interrupted after step {state.get('steps')} of "
                f"{state.get('total_steps')}; this new run replaces it (prompt-kernels train --resume {out} "
                "would have continued it)"
            )


# -- predict ----------------------------------------------------------------------------------------
def run_predict(args) -> tuple[dict, list[dict]]:
    """``prompt-kernels predict``: the saved run ``args.run`` on the CSV ``args.task`` (column ``text``;
    ``label`` optional). Returns ``(summary, rows)``; each row has ``text``, ``label`` (when given),
    ``prediction`` (a label name) and ``confidence`` (its softmax probability)."""
    import safetensors.torch

    import prompt_kernels
    from prompt_kernels.data import read_csv_rows
    from prompt_kernels.models import load_base_model

    run = args.run
    if not os.path.isdir(run):
        raise FileNotFoundError(f"--run: no such run folder: {run}")
    recover_checkpoint(run)
    state = _read_state(run, "--run")
    settings = _saved_settings(run, state)
    names = state.get("label_names")
    if names is None:
        raise ValueError(
            f"--run: {run} was written before runs saved their label names; retrain it to use predict"
        )
    rows = read_csv_rows(args.task, require_label=False)
    if rows.labels is not None:
        index = {name: i for i, name in enumerate(names)}
        for label, line in zip(rows.labels, rows.lines):
            if label not in index:
                raise ValueError(
                    f"--task: {args.task} line {line}: label {label!r} is not one the run was trained on {names}"
                )
    with _quiet_hf_bars(not _stderr_is_tty()):
        model, tok, causal = load_base_model(settings["model"])
    causal = state.get("causal", causal)
    pm = prompt_kernels.load_prompts(model, run)
    head = Head(model.config.hidden_size, len(names), causal)
    _load_into(head, os.path.join(run, HEAD_FILE), safetensors.torch.load_file, flag="--run")
    if hasattr(pm.method, "set_label_embeddings"):
        pm.method.set_label_embeddings(lambda: head.linear.weight)
    max_length = getattr(args, "max_length", None) or settings.get("max_length") or DEFAULTS["max_length"]
    probs = _logits(pm, head, tok, rows.texts, max_length, getattr(args, "batch_size", None) or 64).softmax(
        -1
    )
    conf, pred = probs.max(-1)
    out_rows = []
    for i, text in enumerate(rows.texts):
        row = {"text": text}
        if rows.labels is not None:
            row["label"] = rows.labels[i]
        row["prediction"] = names[int(pred[i])]
        row["confidence"] = round(float(conf[i]), 6)
        out_rows.append(row)
    accuracy = None
    if rows.labels is not None and out_rows:
        accuracy = round(sum(r["prediction"] == r["label"] for r in out_rows) / len(out_rows), 4)
    summary = {
        "run": run,
        "task": args.task,
        "examples": len(out_rows),
        "accuracy": accuracy,
        "steps": state.get("steps"),
        "complete": state.get("complete", True),
        "out": getattr(args, "out", None),
    }
    return summary, out_rows
