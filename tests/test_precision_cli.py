"""The command line in other precisions: QLoRA training of a causal LM (nf4 base, bf16), merge after it
(dequantized and re-quantized, with the report), a classifier on an int8 base evaluated as trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import tiny
from tests.test_cli import invoke, tweets_slice

pytest.importorskip("bitsandbytes")


WORDS = "the cat dog sat ran on mat log a is what answer question : . yes no".split()


def tiny_llama(folder: Path) -> Path:
    return tiny.tiny_llama(folder, WORDS)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    base = tiny_llama(root / "llama")
    rows = [{"prompt": "question : what sat on the mat ? answer :", "completion": "the cat sat on the mat ."},
            {"prompt": "question : what ran on the log ? answer :", "completion": "the dog ran on the log ."}] * 12
    data = root / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = invoke("train", "--base", str(base), "--data", str(data), "--task", "causal-lm", "--method", "lora",
                    "--targets", "all-linear", "--quantize", "nf4", "--dtype", "bf16", "--epochs", "4",
                    "--lr", "0.01", "--batch-size", "8", "--max-length", "32", "--out", str(root / "run"),
                    "--no-progress")
    assert result.exit_code == 0, result.output
    return {"root": root, "base": base, "run": root / "run"}


def test_qlora_training_records_its_base_and_lowers_the_loss(qlora_run):
    metrics = json.loads((qlora_run["run"] / "metrics.json").read_text())
    assert metrics["precision"]["dtype"] == "bf16"
    assert metrics["precision"]["quantization"]["scheme"] == "nf4"
    assert metrics["precision"]["quantization"]["modules"] == 14  # 7 Linears a layer; lm_head is the head
    manifest = json.loads((qlora_run["run"] / "adapter" / "adapter.json").read_text())
    assert manifest["meta"]["precision"]["quantization"]["scheme"] == "nf4"
    losses = json.loads((qlora_run["run"] / "checkpoint" / "state.json").read_text())["history"]["train_loss"]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    info = invoke("info", str(qlora_run["run"]))
    assert info.exit_code == 0, info.output
    assert "bf16 base, nf4 Linear layers (14)" in " ".join(info.output.split())


def test_merge_after_qlora_keeps_the_adapters_outputs_and_writes_plain_weights(qlora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.train.saved import MERGE_PROBE, open_adapter

    out = qlora_run["root"] / "merged"
    result = invoke("merge", str(qlora_run["run"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["how"] == "dequantize" and report["written_dtype"] == "bf16"
    assert report["argmax_agreement"] == 1.0 and report["max_abs_score_difference"] < 0.1
    assert not (out / "quantization.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert not any("absmax" in k for k in merged.state_dict())
    # the merged folder answers as the adapter on its nf4 base did
    am, tokenizer, _, _ = open_adapter(qlora_run["run"])
    batch = tokenizer(MERGE_PROBE, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = am(**batch).logits[:, -1].float()
        got = merged(**AutoTokenizer.from_pretrained(out)(MERGE_PROBE, padding=True, return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.1)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_requantized_merge_reports_the_rounding_it_adds(qlora_run):
    out = qlora_run["root"] / "merged-nf4"
    result = invoke("merge", str(qlora_run["run"]), "--out", str(out), "--quantized", "requantize", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["how"] == "requantize" and report["written_dtype"] == "fp32"
    assert report["max_abs_score_difference"] > 0  # quantizing again rounds
    assert json.loads((out / "quantization.json").read_text()) == {"scheme": "nf4"}
    bad = invoke("merge", str(qlora_run["run"]), "--out", str(out), "--quantized", "sometimes")
    assert bad.exit_code == 2 and "'dequantize' or 'requantize'" in bad.output


def test_bad_precision_options_are_one_line(qlora_run, tmp_path):
    for args, message in ((["--dtype", "fp8"], "use one of fp32, bf16, fp16"),
                          (["--quantize", "int3"], "use one of nf4, int8, int4")):
        result = invoke("train", "--base", str(qlora_run["base"]), "--task", "causal-lm", "--data",
                        str(qlora_run["root"] / "qa.jsonl"), "--out", str(tmp_path / "x"), *args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_classifier_on_an_int8_base_evaluates_and_predicts_as_trained(tmp_path):
    data = tweets_slice(tmp_path / "tweets.csv", rows=60)
    out = tmp_path / "run"
    result = invoke("train", "--data", str(data), "--text-col", "tweet", "--label-col", "mood", "--method", "lora",
                    "--quantize", "int8", "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                    "--out", str(out), "--no-progress", "--no-baseline")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"]["quantization"]["scheme"] == "int8"
    evaluated = invoke("eval", str(out), "--data", str(data))
    assert evaluated.exit_code == 0, evaluated.output
    on_int8 = json.loads(evaluated.output)
    full = json.loads(invoke("eval", str(out), "--data", str(data), "--quantize", "none").output)
    assert on_int8["examples"] == full["examples"] == 60
    assert abs(on_int8["accuracy"] - full["accuracy"]) <= 0.05  # int8 weight-only moves few labels
    predicted = invoke("predict", str(out), "so happy today", "--json", "--dtype", "bf16")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.output)[0]["label"] in {"positive", "negative", "neutral"}


def test_a_server_on_an_nf4_bf16_base_generates_as_the_qlora_adapter_does(qlora_run, tmp_path):
    """The QLoRA adapter served on the same nf4 / bf16 base, routed beside the plain base in one
    continuous batch: its greedy tokens are the ones the adapter gives alone on that base."""
    from adapterkit.serve.engine import Engine
    from adapterkit.train.saved import open_adapter

    am, tokenizer, _, _ = open_adapter(qlora_run["run"])
    prompt = "question : what sat on the mat ? answer :"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=1)[0, ids.shape[1]:].tolist()
    with Engine(str(qlora_run["base"]), tmp_path / "store", quantize="nf4", dtype="bf16", max_wait_ms=20) as engine:
        assert engine.quantized == 14 and engine.health()["precision"]["quantization"]["scheme"] == "nf4"
        engine.store.add("default", "qa", qlora_run["run"] / "adapter")
        futures = [engine.submit_generate(prompt, adapter=name, max_new_tokens=6, ignore_eos=True)
                   for name in ("qa", None, "qa")]
        answers = [f.result() for f in futures]
    until_eos = want[: want.index(1)] if 1 in want else want  # generate() stops at eos (id 1)
    got = answers[0]["token_ids"]
    assert len(until_eos) >= 3 and got[: len(until_eos)] == until_eos
    assert answers[2]["token_ids"] == got
