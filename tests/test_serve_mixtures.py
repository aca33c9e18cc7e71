"""Per-request mixtures in the server: {"adapters": {"a": 0.7, "b": 0.3}} beside single-adapter requests
in the same batches, equal to the mixture run alone through a plain AdaptedModel; bounds and errors."""

from __future__ import annotations

import math
from concurrent.futures import wait

import pytest

pytest.importorskip("fastapi")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve import Engine, create_app  # noqa: E402
from adapterkit.serve.errors import BadRequest  # noqa: E402
from adapterkit.serve.generate import GenerationRow, generate_batch  # noqa: E402

from .serving import engine_with, gpt2_builder, load_minilm, make_adapter, tiny_llama  # noqa: E402

TEXTS = ["the cat sat on the mat", "what a lovely day", "the service was slow and the food cold"]
KEYS = {"key-alice-0001": {"tenant": "alice"}, "key-bob-000001": {"tenant": "bob"}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm_tokenizer):
    root = tmp_path_factory.mktemp("mixtures")
    builder = ak.adapt(load_minilm())
    folders = {f"lora{i}": make_adapter(builder, f"lora{i}", root / f"lora{i}", seed=i, scale=0.3) for i in range(2)}
    folders["bott"] = make_adapter(builder, "bott", root / "bott", seed=5, scale=0.3, config=ak.Bottleneck(reduction=16))
    folders["three"] = make_adapter(builder, "three", root / "three", seed=6, scale=0.3, labels=("a", "b", "c"))
    folders["dora"] = make_adapter(builder, "dora", root / "dora", seed=9, scale=0.3,
                                   config=ak.DoRA(r=4, targets=["query", "value"]))
    reference = ak.adapt(load_minilm())
    for name, folder in folders.items():
        reference.load(folder, name=name)
    reference.eval()
    engine = engine_with(folders, root / "store", tenant="alice", max_wait_ms=30, max_mixture=3)
    engine.store.add("bob", "lora0", folders["lora0"])
    yield {"engine": engine, "reference": reference, "tokenizer": minilm_tokenizer}
    engine.close()


def scores_alone(served, entry, text: str) -> list[float]:
    am = served["reference"]
    with torch.no_grad(), am.route([entry]):
        logits = am(**served["tokenizer"]([text], return_tensors="pt")).logits[0]
    return torch.softmax(logits[:2], -1).tolist()


def test_mixed_requests_share_batches_and_each_equals_its_mixture_alone(served):
    engine = served["engine"]
    plan = [{"lora0": 0.3, "lora1": 0.7}, "lora1", None, {"lora0": 1.5, "lora1": -0.5}, {"lora0": 0.5, "bott": 0.5},
            "dora", {"dora": 0.6, "lora1": 0.4}]
    futures = [(entry, text, engine.submit("classify", [text], entry, "alice")) for entry in plan for text in TEXTS]
    wait([f for _, _, f in futures], timeout=120)
    for entry, text, future in futures:
        answer = future.result()["results"][0]
        got = list(answer["scores"].values())  # in label order (the base's own for the base)
        want = scores_alone(served, entry, text)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4, (entry, text)
    mixed = futures[0][2].result()
    assert mixed["adapters"] == {"lora0": {"version": 1, "weight": 0.3}, "lora1": {"version": 1, "weight": 0.7}}


def test_the_http_api_takes_a_mixture_and_refuses_what_cannot_be_one(served):
    client = TestClient(create_app(served["engine"], KEYS))
    alice = {"Authorization": "Bearer key-alice-0001"}
    ok = client.post("/v1/classify", headers=alice, json={"adapters": {"lora0": 0.3, "lora1": 0.7}, "inputs": TEXTS[:1]})
    assert ok.status_code == 200, ok.text
    want = scores_alone(served, {"lora0": 0.3, "lora1": 0.7}, TEXTS[0])
    assert abs(ok.json()["results"][0]["scores"]["pos"] - want[1]) < 1e-4
    cases = [
        ({"adapters": {"lora0": 0.5, "three": 0.5}}, 422, "label sets"),
        ({"adapters": {"lora0": 0.5, "nope": 0.5}}, 404, "nope"),
        ({"adapters": {}}, 400, "non-empty"),
        ({"adapters": {"lora0": 0.2, "lora1": 0.2, "bott": 0.2, "three": 0.4}}, 413, "at most 3"),
        ({"adapter": "lora0", "adapters": {"lora1": 1.0}}, 400, "not both"),
        ({"adapters": {"lora0": 0.5, "bob/lora0": 0.5}}, 404, "lora0"),
        ({"adapters": {"lora0": "lots"}}, 422, ""),
    ]
    for body, status, message in cases:
        got = client.post("/v1/classify", headers=alice, json={**body, "inputs": TEXTS[:1]})
        assert got.status_code == status and message in got.text, (body, got.status_code, got.text)
    with pytest.raises(BadRequest, match="finite"):
        served["engine"].submit("classify", TEXTS[:1], {"lora0": math.inf}, "alice")
    # the server stays up and answers plain requests after all of that
    assert client.post("/v1/classify", headers=alice, json={"adapter": "lora1", "inputs": TEXTS[:1]}).status_code == 200


def test_a_failing_mixture_leaves_the_rest_of_its_batch_answered(served):
    engine = served["engine"]
    bad = engine.submit("classify", TEXTS[:1], {"lora0": 0.5, "three": 0.5}, "alice")
    good = [engine.submit("classify", [t], "lora0", "alice") for t in TEXTS]
    wait([bad, *good], timeout=60)
    assert "label sets" in str(bad.exception())
    assert all(f.exception() is None for f in good)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-gen")
    base = tiny_llama(root / "llama", positions=96)
    builder = gpt2_builder(base)
    folders = {n: make_adapter(builder, n, root / n, config=ak.LoRA(r=4, targets="all-linear"), labels=None, seed=i,
                               scale=1.0) for i, n in enumerate(["g0", "g1"])}
    engine = Engine(base, root / "store", max_new_tokens=16, max_wait_ms=20)
    reference = gpt2_builder(base)
    for name, folder in folders.items():
        engine.store.add("alice", name, folder)
        reference.load(folder, name=name)
    reference.eval()
    yield {"engine": engine, "reference": reference}
    engine.close()


def test_generation_with_a_mixture_decodes_beside_plain_rows_as_it_would_alone(llama_server):
    engine, reference = llama_server["engine"], llama_server["reference"]
    prompt = "the cat"
    ids = engine.tokenize([prompt])[0]
    plan = [{"g0": 0.6, "g1": 0.4}, "g0", None, {"g0": -1.0, "g1": 2.0}]
    futures = [engine.submit_generate(prompt, entry, "alice", max_new_tokens=8, ignore_eos=True) for entry in plan]
    wait(futures, timeout=120)
    for entry, future in zip(plan, futures, strict=True):
        want = generate_batch(reference, [GenerationRow(ids, 8, ignore_eos=True)], [entry], engine.pad_id,
                              engine.eos_id)[0]
        assert future.result()["token_ids"] == want.tokens, entry


def test_the_openai_api_takes_a_mixture_in_extra_body(llama_server):
    openai = pytest.importorskip("openai")
    from .serving import running_server

    engine = llama_server["engine"]
    with running_server(create_app(engine, KEYS)) as (host, port):
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="key-alice-0001", max_retries=0, timeout=60)
        mixed = client.completions.create(model="g0", prompt="the cat", max_tokens=6, temperature=0,
                                          extra_body={"adapters": {"g0": 0.6, "g1": 0.4}, "ignore_eos": True})
        alone = engine.generate("the cat", {"g0": 0.6, "g1": 0.4}, "alice", max_new_tokens=6, ignore_eos=True)
        assert mixed.choices[0].text == alone["text"]
        with pytest.raises(openai.BadRequestError, match="names the base"):
            client.completions.create(model="g9", prompt="the cat", max_tokens=2,
                                      extra_body={"adapters": {"g0": 0.6, "g1": 0.4}})
