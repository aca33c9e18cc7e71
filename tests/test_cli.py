"""The command line on tiny slices of real data: train, info, predict, eval, export, merge, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterkit.cli import app
from adapterkit.train.data import default_tweets_path

runner = CliRunner()


def tweets_slice(path: Path, rows: int = 90) -> Path:
    """The first rows of each class of the bundled tweets, as a small UTF-8 CSV."""
    per_class: dict[str, list[dict]] = {}
    with open(default_tweets_path(), encoding="latin-1") as handle:
        for row in csv.DictReader(handle):
            bucket = per_class.setdefault(row["sentiment"], [])
            if len(bucket) < rows // 3:
                bucket.append({"tweet": row["text"], "mood": row["sentiment"]})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["tweet", "mood"])
        writer.writeheader()
        for bucket in per_class.values():
            writer.writerows(bucket)
    return path


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = tweets_slice(root / "tweets.csv")
    runs = {}
    for method in ("bottleneck", "lora"):
        out = root / method
        # the LoRA run also trains its own pooler copy, which merge and export must carry
        extra = ["--targets", "query", "--targets", "value", "--modules-to-save", "bert.pooler"] if method == "lora" else []
        result = invoke("train", "--data", str(data), "--text-col", "tweet", "--label-col", "mood",
                        "--method", method, "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                        "--name", method, "--out", str(out), "--no-progress", *extra)
        assert result.exit_code == 0, result.output
        assert "test accuracy" in result.output
        runs[method] = out
    runs["data"] = data
    return runs


def test_train_writes_run_folder(trained):
    out = trained["bottleneck"]
    for name in ("adapter/adapter.safetensors", "adapter/adapter.json", "metrics.json", "curves.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_macro_f1", "trainable_params", "base_params", "adapter_bytes", "peak_rss_bytes"):
        assert metrics[key] is not None, key
    assert 0 < metrics["trainable_params"] < 0.05 * metrics["base_params"]
    assert metrics["adapter_bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    manifest = json.loads((out / "adapter" / "adapter.json").read_text())
    assert manifest["labels"] == ["negative", "neutral", "positive"]
    # A user's own data is used whole, and the run says how it was split.
    assert metrics["examples"] == metrics["examples_available"]
    assert sum(metrics["examples"].values()) == 90 and metrics["examples"]["train"] == 72
    assert "tweets.csv" in metrics["split"] and "80/10/10" in metrics["split"]
    assert metrics["settings"]["lr"] == 3e-3  # the bottleneck's default, when --lr is not given


def test_caps_apply_to_the_bundled_demo_only(tmp_path):
    from adapterkit.train.job import DEMO_CAPS, JobSpec

    assert JobSpec().caps() == DEMO_CAPS
    assert JobSpec(data="mine.csv").caps() == {"train": None, "validation": None, "test": None}
    assert JobSpec(data="mine.csv", max_train_examples=50).caps()["train"] == 50
    assert JobSpec(max_test_examples=None).caps()["test"] is None
    data = tweets_slice(tmp_path / "tweets.csv")
    result = invoke("train", "--data", str(data), "--text-col", "tweet", "--label-col", "mood", "--epochs", "1",
                    "--max-train", "20", "--max-test", "5", "--max-length", "16", "--out", str(tmp_path / "run"),
                    "--no-progress", "--no-pooler-copy")
    assert result.exit_code == 0, result.output
    assert "20 train (capped, of 72), 9 validation, 5 test (capped, of 9)" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 20, "validation": 9, "test": 5}
    assert metrics["settings"]["caps"] == {"train": 20, "validation": None, "test": 5}
    result = invoke("train", "--data", str(data), "--max-train", "-1", "--out", str(tmp_path / "bad"))
    assert result.exit_code != 0 and ">= 0" in result.output


def test_info_predict_eval(trained):
    out = trained["bottleneck"]
    result = invoke("info", str(out))
    assert result.exit_code == 0, result.output
    assert "bottleneck" in result.output and "negative" in result.output
    result = invoke("predict", str(out), "I love this so much", "worst day ever")
    assert result.exit_code == 0, result.output
    assert "negative=" in result.output and "positive=" in result.output
    result = invoke("eval", str(out), "--data", str(trained["data"]), "--text-col", "tweet", "--label-col", "mood",
                    "--max-length", "16")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["examples"] == 90 and 0 <= report["accuracy"] <= 1


def test_export_peft_and_merge_match_adapter(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterkit.train.saved import open_adapter

    out = trained["lora"]
    result = invoke("export", str(out), "--out", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    result = invoke("merge", str(out), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    am, tokenizer, name, _ = open_adapter(out)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(["so happy today", "meh"], padding=True,
                                                               return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, am(**batch).logits, atol=1e-5, rtol=1e-4)
    assert merged.config.id2label[0] == "negative"
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier", "bert.pooler"]
    own_pooler = am.adapter(name).copy_of("bert.pooler").dense.weight
    assert torch.equal(merged.bert.pooler.dense.weight, own_pooler)
    assert not torch.equal(own_pooler, am.base.bert.pooler.dense.weight)  # training moved the copy


def test_merge_bottleneck_is_a_clear_error(trained, tmp_path):
    result = invoke("merge", str(trained["bottleneck"]), "--out", str(tmp_path / "m"))
    assert result.exit_code == 2
    assert "cannot be merged" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text-col", "nope"], "columns"),
        (["--method", "magic"], "unknown method"),
    ],
)
def test_train_bad_input_is_one_line(trained, tmp_path, args, message):
    result = invoke("train", "--data", str(trained["data"]), "--label-col", "mood", "--out", str(tmp_path / "x"),
                    "--no-progress", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_train_unreadable_and_empty_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    for path in (tmp_path / "missing.csv", empty, tmp_path / "data.xyz"):
        if path.suffix == ".xyz":
            path.write_text("x")
        result = invoke("train", "--data", str(path), "--out", str(tmp_path / "run"), "--no-progress")
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "Traceback" not in result.output


def test_help_explains_every_option():
    for command in ("train", "eval", "predict", "info", "merge", "export", "serve"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
    text = invoke("train", "--help").output
    for option in ("--base", "--data", "--method", "--epochs", "--lr", "--batch-size", "--max-length", "--seed",
                   "--out", "--task"):
        assert option in text
