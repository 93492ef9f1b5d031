"""Resumable, seeded epochs of shuffled training rows (the command line's batches and SPT's search).

Each epoch draws a fresh permutation of ``range(n)`` from one ``random.Random(seed)``; a subclass cuts
it into batches. The position (epoch, batch) and the generator state at the start of the epoch are a
``state_dict``, so a run resumed from a checkpoint sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod


class SeededEpochs(ABC):
    """Base class: ``next()`` gives the next batch; subclasses define ``_new_epoch(order)`` (called with
    each epoch's permutation), ``_num_batches()`` and ``_batch(i)``."""

    what = "data order"  # named in the error of a checkpoint that does not fit

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = random.Random(seed)
        self.epoch, self.batch = 0, 0
        self._shuffle()

    def _shuffle(self) -> None:
        self._epoch_rng_state = self.rng.getstate()
        order = list(range(self.n))
        self.rng.shuffle(order)
        self._new_epoch(order)

    @abstractmethod
    def _new_epoch(self, order: list[int]) -> None: ...

    @abstractmethod
    def _num_batches(self) -> int: ...

    @abstractmethod
    def _batch(self, i: int): ...

    def next(self):
        if self.batch >= self._num_batches():
            self.epoch, self.batch = self.epoch + 1, 0
            self._shuffle()
        out = self._batch(self.batch)
        self.batch += 1
        return out

    def state_dict(self) -> dict:
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "batch": self.batch,
            "rng_state": self._epoch_rng_state,
        }

    def load_state_dict(self, sd: dict) -> None:
        if (sd["n"], sd["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(
                f"the saved {self.what} is for {sd['n']} training rows in batches of {sd['batch_size']}, "
                f"not {self.n} in batches of {self.batch_size}"
            )
        self.rng.setstate(sd["rng_state"])
        self._shuffle()
        self.epoch, self.batch = sd["epoch"], sd["batch"]
