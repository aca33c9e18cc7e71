"""Generation on a causal-LM base: mixed-adapter batches, seeds, streaming over HTTP."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve import Engine, create_app  # noqa: E402
from adapterkit.serve.errors import BadRequest, PayloadTooLarge  # noqa: E402

from .serving import gpt2_builder, make_adapter, tiny_gpt2  # noqa: E402

PROMPTS = ["the cat sat on", "hello world", "we like green tea a lot and"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = tiny_gpt2(root / "gpt2")
    builder = gpt2_builder(base)
    folders = {f"g{i}": make_adapter(builder, f"g{i}", root / f"g{i}", config=ak.LoRA(r=4, targets=["c_attn", "c_fc"]),
                                     labels=None, seed=i, scale=1.0) for i in range(3)}
    engine = Engine(base, root / "store", max_wait_ms=30, max_new_tokens=16)
    for name, folder in folders.items():
        engine.store.add("default", name, folder)
    reference = gpt2_builder(base)
    for name, folder in folders.items():
        reference.load(folder, name=name)
    reference.eval()
    yield engine, reference
    engine.close()


def expected(reference, tokenizer, name, prompt, n=8) -> list[int]:
    """Greedy decoding of the prompt alone with its adapter active (Hugging Face generate)."""
    reference.activate(name)
    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = reference.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens


def test_mixed_adapter_batch_equals_each_prompt_alone(setup):
    engine, reference = setup
    plan = [(name, prompt) for prompt in PROMPTS for name in ("g0", "g1", "g2", None)]
    futures = [engine.submit_generate(prompt, adapter=name, max_new_tokens=8) for name, prompt in plan]
    outs = [f.result(timeout=120) for f in futures]
    labels = {"kind": "generate"}
    steps = engine.metrics.registry.get_sample_value("adapterkit_batch_size_count", labels)
    rows = engine.metrics.registry.get_sample_value("adapterkit_batch_size_sum", labels)
    assert rows > steps  # prompts for different adapters shared decoding steps (a step of one row each otherwise)
    distinct = set()
    for (name, prompt), out in zip(plan, outs, strict=True):
        assert out["token_ids"] == expected(reference, engine.tokenizer, name, prompt), (name, prompt)
        assert out["adapter"] == name and out["tokens"] == len(out["token_ids"])
        distinct.add(tuple(out["token_ids"]))
    assert len(distinct) > len(PROMPTS)  # the adapters change what is generated


def test_sampling_is_seeded_per_request(setup):
    engine, _ = setup
    a = engine.generate("hello world", adapter="g1", max_new_tokens=12, temperature=1.5, seed=3)
    b = engine.generate("hello world", adapter="g1", max_new_tokens=12, temperature=1.5, seed=3)
    c = [engine.generate("hello world", adapter="g1", max_new_tokens=12, temperature=1.5, seed=s)["token_ids"]
         for s in range(4, 8)]
    assert a["token_ids"] == b["token_ids"] and any(t != a["token_ids"] for t in c)


def test_limits_and_embed_on_a_causal_base(setup):
    engine, _ = setup
    with pytest.raises(BadRequest):
        engine.classify(["hello"])
    with pytest.raises(PayloadTooLarge):
        engine.generate("hello", max_new_tokens=17)
    with pytest.raises(PayloadTooLarge):
        engine.generate("the " * 60, max_new_tokens=8)
    vectors = engine.embed(["hello world", "the cat"], adapter="g0")["vectors"]
    assert len(vectors) == 2 and len(vectors[0]) == 32


def test_http_generate_and_stream(setup):
    engine, reference = setup
    with TestClient(create_app(engine)) as client:
        body = {"adapter": "g2", "prompt": "the cat sat on", "max_new_tokens": 8}
        plain = client.post("/v1/generate", json=body).json()
        assert plain["token_ids"] == expected(reference, engine.tokenizer, "g2", "the cat sat on")
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        tokens, final = events[:-1], events[-1]
        assert final["done"] and final["token_ids"] == plain["token_ids"]
        assert [e["token_id"] for e in tokens] == plain["token_ids"]
        assert "".join(e["token"] for e in tokens).strip() == plain["text"].strip()
        assert client.post("/v1/generate", json={**body, "adapter": "nope"}).status_code == 404
        assert client.post("/v1/classify", json={"inputs": ["x"]}).status_code == 400
