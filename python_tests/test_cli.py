"""The command line end to end on a tiny random BERT and a tiny CSV: train, save, resume, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from prompt_kernels import cli


def make_tiny_model_dir(path, seed: int = 0) -> str:
    """A tiny random BERT (2 layers, d = 32, dropout on) with MiniLM's tokenizer, saved to ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from prompt_kernels.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"))


def write_csv(path, rows, header=("text", "label"), encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


WORDS = {"good": "pos", "great": "pos", "fine": "pos", "bad": "neg", "awful": "neg", "dull": "neg"}
TINY_ROWS = [(f"a {w} movie number {i}", lab) for i in range(8) for w, lab in WORDS.items()]


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("csv") / "task.csv", TINY_ROWS)


def _train(capsys, *args):
    rc = cli.main(
        ["train", "--no-progress", "--batch-size", "4", "--max-length", "16", "--prompt-length", "3", *args]
    )
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_train_save_resume(tiny_model_dir, tiny_csv, tmp_path, capsys, method):
    out_dir = str(tmp_path / "run")
    rc, out, err = _train(
        capsys,
        "--method",
        method,
        "--model",
        tiny_model_dir,
        "--task",
        tiny_csv,
        "--steps",
        "3",
        "--out",
        out_dir,
    )
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) >= {"method", "accuracy", "steps", "seconds", "trainable_parameters"}
    assert result["method"] == method and result["steps"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert result["trainable_parameters"] > 0
    for name in ("config.json", "head.safetensors", "optimizer.pt", "metrics.json", "state.json"):
        assert os.path.exists(os.path.join(out_dir, name)), name
    assert any(f.endswith(".safetensors") and f != "head.safetensors" for f in os.listdir(out_dir))
    rc, out, err = _train(
        capsys,
        "--method",
        method,
        "--model",
        tiny_model_dir,
        "--task",
        tiny_csv,
        "--steps",
        "2",
        "--out",
        out_dir,
        "--resume",
        out_dir,
    )
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 5


def test_missing_task_file(tiny_model_dir, tmp_path, capsys):
    rc, _, err = _train(
        capsys, "--model", tiny_model_dir, "--task", str(tmp_path / "nope.csv"), "--steps", "1"
    )
    assert rc != 0 and "no such file" in err


def test_csv_without_columns(tiny_model_dir, tmp_path, capsys):
    path = write_csv(tmp_path / "bad.csv", [("x", "1"), ("y", "0")], header=("sentence", "y"))
    rc, _, err = _train(capsys, "--model", tiny_model_dir, "--task", path, "--steps", "1")
    assert rc != 0 and "'text' and 'label'" in err


def test_single_class(tiny_model_dir, tmp_path, capsys):
    path = write_csv(tmp_path / "one.csv", [(f"t{i}", "a") for i in range(10)])
    rc, _, err = _train(capsys, "--model", tiny_model_dir, "--task", path, "--steps", "1")
    assert rc != 0 and "at least 2" in err


def test_unknown_model(tiny_csv, capsys):
    rc, _, err = _train(capsys, "--model", "no-such-model", "--task", tiny_csv, "--steps", "1")
    assert rc != 0 and "--model" in err


def test_prompt_longer_than_positions(tiny_model_dir, tiny_csv, capsys):
    rc = cli.main(
        [
            "train",
            "--no-progress",
            "--model",
            tiny_model_dir,
            "--task",
            tiny_csv,
            "--prompt-length",
            "60",
            "--max-length",
            "16",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "maximum of 64 positions" in err


def test_unknown_method_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "prompt_kernels.cli", "train", "--method", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


# -- CSV problems ---------------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["short row", "empty label"])
def test_csv_row_without_a_label_names_the_line(tiny_model_dir, tmp_path, capsys, missing):
    path = tmp_path / "gap.csv"
    lines = ["text,label", *(f"row {i},{'ab'[i % 2]}" for i in range(6))]
    lines.insert(4, "no label here" if missing == "short row" else "no label here,")
    path.write_text("\n".join(lines) + "\n")
    rc, _, err = _train(capsys, "--model", tiny_model_dir, "--task", str(path), "--steps", "1")
    assert rc == 2 and "line 5" in err and "no label" in err, err
    assert "NoneType" not in err


def test_csv_with_a_utf8_bom_is_read(tiny_model_dir, tmp_path, capsys):
    """Excel's "CSV UTF-8" export starts with a byte-order mark."""
    path = write_csv(tmp_path / "excel.csv", TINY_ROWS, encoding="utf-8-sig")
    assert open(path, "rb").read(3) == b"\xef\xbb\xbf"
    rc, _, err = _train(
        capsys, "--model", tiny_model_dir, "--task", path, "--steps", "1", "--out", str(tmp_path / "r")
    )
    assert rc == 0, err
    assert json.load(open(tmp_path / "r" / "state.json"))["label_names"] == ["neg", "pos"]


def test_tiny_eval_split_warns(tiny_model_dir, tmp_path, capsys):
    """Two rows: one to train on, one to evaluate on, whose label the training row lacks. The run goes
    on (a smoke test on a tiny CSV is legitimate) but says why its accuracy means nothing."""
    path = write_csv(tmp_path / "two.csv", [("a good movie", "pos"), ("a bad movie", "neg")])
    rc, out, err = _train(
        capsys, "--model", tiny_model_dir, "--task", path, "--steps", "1", "--out", str(tmp_path / "r")
    )
    assert rc == 0, err
    assert "warning" in err and "1 example" in err, err
    assert "not in the training split" in err, err
    assert json.loads(out.strip().splitlines()[-1])["eval_examples"] == 1


def test_string_labels_mapping_is_saved(tiny_model_dir, tiny_csv, tmp_path, capsys):
    rc, _, err = _train(
        capsys, "--model", tiny_model_dir, "--task", tiny_csv, "--steps", "1", "--out", str(tmp_path / "r")
    )
    assert rc == 0, err
    state = json.load(open(tmp_path / "r" / "state.json"))
    assert state["label_names"] == ["neg", "pos"] and state["num_labels"] == 2


def test_progress_is_sparse_when_not_a_terminal(tiny_model_dir, tiny_csv, tmp_path, capsys):
    """Under capsys stderr is not a tty: no bar redraws (``\\r``), a handful of log lines."""
    capsys.readouterr()  # (what the fixtures printed)
    argv = ["train", "--model", tiny_model_dir, "--task", tiny_csv, "--steps", "40", "--batch-size", "4"]
    rc = cli.main([*argv, "--max-length", "16", "--prompt-length", "3", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "\r" not in err, err[:500]
    lines = [line for line in err.splitlines() if "step" in line]
    assert 1 <= len(lines) <= 12, err
    assert "step 40/40" in lines[-1], lines
