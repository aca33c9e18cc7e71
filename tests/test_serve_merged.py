"""The dominant adapter served from merged weights, and an int8 base with adapters routed on top."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

import adapterkit as ak  # noqa: E402
from adapterkit.serve import Engine  # noqa: E402

from .serving import Reference, engine_with, load_minilm, make_adapter  # noqa: E402

TEXTS = ["the cat sat on the mat", "what a lovely day", "we like green tea a lot more than coffee",
         "the service was slow and the food cold", "it rained all day"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    builder = ak.adapt(load_minilm())
    root = tmp_path_factory.mktemp("merged")
    out = {f"lora{i}": make_adapter(builder, f"lora{i}", root / f"lora{i}", seed=i, scale=0.3) for i in range(2)}
    out["ia3"] = make_adapter(builder, "ia3", root / "ia3", seed=7, scale=0.3,
                              config=ak.IA3(targets=["key", "value", "output.dense"]))
    out["bottleneck"] = make_adapter(builder, "bottleneck", root / "bottleneck", seed=8, scale=0.3,
                                     config=ak.Bottleneck(reduction=16))
    return out


@pytest.fixture(scope="module")
def reference(minilm_tokenizer):
    return Reference(ak.adapt(load_minilm()), minilm_tokenizer)


def _engine(folders, root, **options) -> Engine:
    return engine_with(folders, root, max_wait_ms=1, **options)


def _check(engine, folders, reference, name: str) -> None:
    out = engine.classify(TEXTS, adapter=name)["results"]
    for text, answer in zip(TEXTS, out, strict=True):
        expected = reference.scores(folders[name], text)
        got = [answer["scores"][label] for label in reference.labels(folders[name])]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < ATOL, (name, text)


def test_one_adapter_traffic_is_served_merged_and_mixed_traffic_unmerges(folders, reference, tmp_path):
    with _engine(folders, tmp_path / "store", merge_after=3) as engine:
        merging = engine.merging
        for _ in range(4):
            _check(engine, folders, reference, "lora0")
        assert merging.merged == "default__lora0__v1" and merging.merges == 1
        assert engine.am.state.merged == {"default__lora0__v1"}
        _check(engine, folders, reference, "lora1")  # another adapter: unmerged first, then routed
        assert merging.merged is None and merging.unmerges == 1 and not engine.am.state.merged
        futures = [engine.submit("classify", [t], adapter=n) for t in TEXTS for n in ("lora0", "lora1", None)]
        assert all(f.result(timeout=60) for f in futures) and merging.merged is None
        for _ in range(4):
            _check(engine, folders, reference, "ia3")
        assert merging.merged == "default__ia3__v1"
        for _ in range(4):  # a bottleneck adapter has a nonlinearity: never merged
            _check(engine, folders, reference, "bottleneck")
        assert merging.merged is None
        _check(engine, folders, reference, "lora0")


def test_a_merged_adapter_that_is_evicted_leaves_the_base_clean(folders, reference, tmp_path):
    with _engine(folders, tmp_path / "store", merge_after=2) as engine:
        for _ in range(3):
            _check(engine, folders, reference, "lora1")
        assert engine.merging.merged is not None
        engine.unload("default", "lora1")
        engine.classify(["x"])  # the base, after the eviction
        assert not engine.am.state.merged and engine.merging.merged is None
        base = engine.classify(TEXTS)["results"]
        with _engine(folders, tmp_path / "fresh", merge_after=0) as fresh:
            again = fresh.classify(TEXTS)["results"]
        for a, b in zip(base, again, strict=True):
            assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) < ATOL
        _check(engine, folders, reference, "lora1")


def _probed_sentiment_adapters(root, minilm_tokenizer) -> dict:
    """Moved LoRA adapters whose heads are linear probes of labelled tweets through them: a random head
    on MiniLM's normalised sentence embedding reads noise, and its answers are coin tosses that any
    rounding flips; a head that reads the data's signal gives answers worth agreeing on."""
    import csv

    import torch
    from datasets import Dataset

    from adapterkit.train.data import classification_collator, default_tweets_path, tokenize_classification
    from adapterkit.train.probe import probe_head

    rows: dict[str, list[str]] = {}
    with open(default_tweets_path(), encoding="latin-1") as handle:
        for row in csv.DictReader(handle):
            if row["sentiment"] in ("negative", "positive") and len(rows.setdefault(row["sentiment"], [])) < 60:
                rows[row["sentiment"]].append(row["text"])
    texts = rows["negative"] + rows["positive"]
    data = Dataset.from_dict({"text": texts, "label": [0] * 60 + [1] * 60})
    data = tokenize_classification(data, minilm_tokenizer, 48).shuffle(seed=0)
    collate = classification_collator(minilm_tokenizer)
    builder = ak.adapt(load_minilm())
    folders = {}
    for i in range(2):
        name = f"lora{i}"
        with torch.random.fork_rng():
            torch.manual_seed(i)
            builder.add(name, ak.LoRA(r=4, targets=["query", "value"]), labels=["negative", "positive"])
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in builder.adapter_parameters(name):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        assert probe_head(builder, name, data.select(range(90)), data.select(range(90, 120)), collate)
        builder.save(name, root / name)
        builder.delete(name, collect=False)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize("quantize, dtype", [("int8", "fp32"), ("nf4", "fp32"), (None, "bf16")])
def test_a_quantized_or_bf16_base_routes_adapters_and_agrees_with_fp32(minilm_tokenizer, tmp_path, quantize, dtype):
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    folders = _probed_sentiment_adapters(tmp_path, minilm_tokenizer)
    reference = Reference(ak.adapt(load_minilm()), minilm_tokenizer)
    with _engine(folders, tmp_path / "int8", quantize=quantize, dtype=dtype, merge_after=2) as engine:
        assert engine.quantized == (0 if quantize is None else 36)  # 6 layers x 6 Linears
        assert engine.health()["precision"]["dtype"] == dtype
        deviations, clear, agree = [], 0, 0
        for name in ("lora0", "lora1"):
            out = engine.classify(TEXTS, adapter=name)["results"]
            labels = reference.labels(folders[name])
            for text, answer in zip(TEXTS, out, strict=True):
                expected = reference.scores(folders[name], text)
                got = [answer["scores"][label] for label in labels]
                deviations += [abs(x - y) for x, y in zip(got, expected, strict=True)]
                if max(expected) > 0.7:  # a clear fp32 answer: int8 must give the same label
                    clear += 1
                    agree += answer["label"] == labels[expected.index(max(expected))]
        assert clear >= 4 and agree == clear
        # near fp32, not equal; nf4 (4 bits, on a 22M-parameter model, adapters trained in fp32) moves
        # scores further but keeps every clear label
        assert 0 < sum(deviations) / len(deviations) < (0.35 if quantize == "nf4" else 0.1)
        for _ in range(3):  # quantized weights are not merged into: the adapter stays routed
            engine.classify(TEXTS, adapter="lora0")
        if quantize is not None:
            assert engine.merging.merged is None and not engine.am.state.merged
