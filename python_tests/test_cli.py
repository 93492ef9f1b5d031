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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from prompt_kernels.models import minilm_path

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    words = {"good": "pos", "great": "pos", "fine": "pos", "bad": "neg", "awful": "neg", "dull": "neg"}
    rows = [(f"a {w} movie number {i}", lab) for i in range(8) for w, lab in words.items()]
    return _write_csv(tmp_path_factory.mktemp("csv") / "task.csv", rows)


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
    path = _write_csv(tmp_path / "bad.csv", [("x", "1"), ("y", "0")], header=("sentence", "y"))
    rc, _, err = _train(capsys, "--model", tiny_model_dir, "--task", path, "--steps", "1")
    assert rc != 0 and "'text' and 'label'" in err


def test_single_class(tiny_model_dir, tmp_path, capsys):
    path = _write_csv(tmp_path / "one.csv", [(f"t{i}", "a") for i in range(10)])
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
