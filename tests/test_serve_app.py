"""The HTTP API: every route, tenants, bad input, upload -> serve -> rollback -> delete."""

from __future__ import annotations

import asyncio
import io
import json
import random
import tarfile

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve import Engine, create_app, is_loopback, serve_command  # noqa: E402

from .serving import (  # noqa: E402
    Reference,
    archive,
    gpt2_builder,
    load_minilm,
    make_adapter,
    minilm_path,
    tar_bytes,
    tiny_gpt2,
)

ACME = {"Authorization": "Bearer key-acme-0001"}
GLOBEX = {"X-API-Key": "key-globex-001"}
ADMIN = {"X-API-Key": "key-admin-0001"}
KEYS = {"key-acme-0001": {"tenant": "acme"}, "key-globex-001": {"tenant": "globex"},
        "key-admin-0001": {"admin": True}}
ATOL = 1e-4


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    builder = ak.adapt(load_minilm())
    root = tmp_path_factory.mktemp("src")
    folders = {f"s{i}": make_adapter(builder, f"s{i}", root / f"s{i}", seed=i, scale=0.3) for i in range(3)}
    folders["three"] = make_adapter(builder, "three", root / "three", seed=7, labels=["a", "b", "c"], scale=0.3)
    gpt = gpt2_builder(tiny_gpt2(root / "gpt2"))
    folders["foreign"] = make_adapter(gpt, "foreign", root / "foreign", config=ak.LoRA(r=2, targets=["c_attn"]),
                                      labels=None)
    archives = root / "archives"
    archives.mkdir()
    for name in list(folders):
        folders[f"{name}.tar.gz"] = archive(folders[name], archives / f"{name}.tar.gz")
    folders["s1.zip"] = archive(folders["s1"], archives / "s1.zip", fmt="zip")
    return folders


@pytest.fixture(scope="module")
def reference(minilm_tokenizer):
    return Reference(ak.adapt(load_minilm()), minilm_tokenizer)


@pytest.fixture(scope="module")
def engine(src, tmp_path_factory):
    eng = Engine(minilm_path(), tmp_path_factory.mktemp("store"), max_inputs=8, max_wait_ms=10)
    eng.store.add("acme", "sent", src["s0"])
    eng.store.add("acme", "topic", src["three"])
    eng.store.add("globex", "sent", src["s1"])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, KEYS)) as c:
        yield c


def scores(body: dict) -> list[float]:
    return list(body["results"][0]["scores"].values())


def close(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) < ATOL


def upload(client, name: str, path, headers=ACME, kind: str = "application/gzip"):
    return client.put(f"/v1/adapters/{name}", content=path.read_bytes(), headers={**headers, "content-type": kind})


def test_health_docs_and_openapi(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/embed", "/v1/generate", "/v1/adapters", "/healthz", "/metrics"} <= set(paths)


def test_keys_are_required(client):
    assert client.post("/v1/classify", json={"adapter": "sent", "inputs": ["x"]}).status_code == 401
    r = client.post("/v1/classify", json={"adapter": "sent", "inputs": ["x"]}, headers={"X-API-Key": "wrong-key-123"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/adapters").status_code == 401


def test_classify_uses_the_tenants_own_adapter(client, src, reference):
    text = "the film was fine"
    acme = client.post("/v1/classify", json={"adapter": "sent", "inputs": [text]}, headers=ACME).json()
    globex = client.post("/v1/classify", json={"adapter": "sent", "inputs": [text]}, headers=GLOBEX).json()
    assert close(scores(acme), reference.scores(src["s0"], text))
    assert close(scores(globex), reference.scores(src["s1"], text))
    topic = client.post("/v1/classify", json={"adapter": "topic", "inputs": [text, "b"]}, headers=ACME).json()
    assert list(topic["results"][0]["scores"]) == ["a", "b", "c"] and len(topic["results"]) == 2
    base = client.post("/v1/classify", json={"inputs": [text]}, headers=ACME).json()
    assert base["adapter"] is None and len(scores(base)) == 2


def test_tenants_cannot_see_each_other(client):
    for method, path, body in [
        ("POST", "/v1/classify", {"adapter": "globex/sent", "inputs": ["x"]}),
        ("POST", "/v1/classify", {"adapter": "topic", "inputs": ["x"]}),
        ("POST", "/v1/embed", {"adapter": "globex/sent", "inputs": ["x"]}),
        ("GET", "/v1/adapters/globex/sent", None),
        ("GET", "/v1/adapters/topic", None),
        ("POST", "/v1/adapters/globex/sent/rollback", None),
        ("DELETE", "/v1/adapters/globex/sent", None),
        ("PUT", "/v1/adapters/globex/sent", None),
    ]:
        headers = ACME if "globex" in path or "globex" in json.dumps(body) else GLOBEX
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 404, (method, path, r.text)
    # another tenant's adapter reads exactly like one that does not exist
    for ref, absent in (("topic", "nope"), ("globex/sent", "globex/nope")):
        headers = GLOBEX if ref == "topic" else ACME
        there = client.post("/v1/classify", json={"adapter": ref, "inputs": ["x"]}, headers=headers).json()
        missing = client.post("/v1/classify", json={"adapter": absent, "inputs": ["x"]}, headers=headers).json()
        assert there["error"]["message"].replace(ref, "?") == missing["error"]["message"].replace(absent, "?")
    listed = client.get("/v1/adapters", headers=GLOBEX).json()["adapters"]
    assert [a["name"] for a in listed] == ["sent"] and "tenant" not in listed[0]
    assert client.get("/metrics", headers=ACME).status_code == 403


def test_admin_manages_every_tenant(client, src, reference):
    listed = client.get("/v1/adapters", headers=ADMIN).json()["adapters"]
    assert {(a["tenant"], a["name"]) for a in listed} >= {("acme", "sent"), ("acme", "topic"), ("globex", "sent")}
    only = client.get("/v1/adapters", params={"tenant": "globex"}, headers=ADMIN).json()["adapters"]
    assert {a["tenant"] for a in only} == {"globex"}
    r = client.post("/v1/classify", json={"adapter": "globex/sent", "inputs": ["hello"]}, headers=ADMIN).json()
    assert close(scores(r), reference.scores(src["s1"], "hello"))
    one = client.get("/v1/adapters/acme/topic", headers=ADMIN).json()
    assert one["labels"] == ["a", "b", "c"] and one["method"] == "lora" and one["version"] == 1


def test_embed(client):
    r = client.post("/v1/embed", json={"adapter": "sent", "inputs": ["a", "b c"], "normalize": True}, headers=ACME)
    vectors = r.json()["vectors"]
    assert len(vectors) == 2 and len(vectors[0]) == 384


def test_bad_input_is_a_clear_4xx(client):
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"adapter": "sent"}).encode(), 422, "invalid_request"),
        (json.dumps({"adapter": "sent", "inputs": "text"}).encode(), 422, "invalid_request"),
        (json.dumps({"adapter": "sent", "inputs": []}).encode(), 400, "bad_request"),
        (json.dumps({"adapter": "sent", "inputs": ["x"] * 9}).encode(), 413, "too_large"),
        (json.dumps({"adapter": "sent", "inputs": ["word " * 5000]}).encode(), 413, "too_large"),
        (json.dumps({"adapter": "sent", "inputs": ["word " * 600]}).encode(), 413, "too_large"),
        (json.dumps({"adapter": "unknown", "inputs": ["x"]}).encode(), 404, "not_found"),
        (json.dumps({"adapter": "../../etc", "inputs": ["x"]}).encode(), 404, "not_found"),
    ]
    for body, status, code in cases:
        r = client.post("/v1/classify", content=body, headers={**ACME, "content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["code"] == code, (body[:40], r.text)
    r = client.post("/v1/generate", json={"adapter": "sent", "prompt": "hi"}, headers=ACME)
    assert r.status_code == 400 and "causal" in r.json()["error"]["message"]
    assert client.post("/v1/classify", json={"adapter": "sent", "inputs": ["ok"]}, headers=ACME).status_code == 200


def test_upload_serve_rollback_delete(client, src, reference):
    text = "service was slow"
    r = upload(client, "fresh", src["s0.tar.gz"])
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["loaded"]
    v1 = client.post("/v1/classify", json={"adapter": "fresh", "inputs": [text]}, headers=ACME).json()
    assert v1["version"] == 1 and close(scores(v1), reference.scores(src["s0"], text))
    r = client.put("/v1/adapters/fresh", files={"file": ("s1.zip", src["s1.zip"].read_bytes())}, headers=ACME)
    assert r.status_code == 201 and r.json()["version"] == 2
    v2 = client.post("/v1/classify", json={"adapter": "fresh", "inputs": [text]}, headers=ACME).json()
    assert v2["version"] == 2 and close(scores(v2), reference.scores(src["s1"], text))
    listed = {a["name"]: a for a in client.get("/v1/adapters", headers=ACME).json()["adapters"]}
    assert listed["fresh"]["versions"] == [1, 2] and listed["fresh"]["loaded"] and listed["fresh"]["size_bytes"] > 0
    r = client.post("/v1/adapters/fresh/rollback", headers=ACME)
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["rolled_back_from"] == 2
    assert r.json()["versions"] == [1]  # the withdrawn version is deleted (serve README)
    back = client.post("/v1/classify", json={"adapter": "fresh", "inputs": [text]}, headers=ACME).json()
    assert back["version"] == 1 and close(scores(back), scores(v1))
    assert client.post("/v1/adapters/fresh/rollback", headers=ACME).status_code == 409
    r = client.delete("/v1/adapters/fresh", headers=ACME)
    assert r.status_code == 200 and r.json()["versions"] == [1]
    assert client.post("/v1/classify", json={"adapter": "fresh", "inputs": [text]}, headers=ACME).status_code == 404
    assert client.delete("/v1/adapters/fresh", headers=ACME).status_code == 404


def test_upload_a_folder_named_in_the_store(client, engine, src):
    incoming = engine.store.root / "acme" / "incoming" / "x"
    incoming.mkdir(parents=True)
    for f in src["three"].iterdir():
        (incoming / f.name).write_bytes(f.read_bytes())
    r = client.put("/v1/adapters/fromstore", json={"source": "incoming/x"}, headers=ACME)
    assert r.status_code == 201 and r.json()["labels"] == ["a", "b", "c"]
    r = client.put("/v1/adapters/steal", json={"source": "../globex/sent/v1"}, headers=ACME)
    assert r.status_code == 404
    r = client.put("/v1/adapters/steal", json={"source": "/etc"}, headers=ACME)
    assert r.status_code == 404
    assert client.delete("/v1/adapters/fromstore", headers=ACME).status_code == 200


def test_bad_uploads_leave_the_live_version_serving(client, engine, src):
    good = src["s0"]
    files = {f.name: f.read_bytes() for f in good.iterdir()}
    truncated = src["s0.tar.gz"].read_bytes()
    corrupt = dict(files, **{"adapter.safetensors": files["adapter.safetensors"][:-200]})
    bad = {
        "wrong fingerprint": (src["foreign.tar.gz"].read_bytes(), 422),
        "truncated archive": (truncated[: len(truncated) // 2], 400),
        "truncated tensors": (tar_bytes(corrupt), 400),  # its size disagrees with its own header
        "pickle": (tar_bytes({**files, "pytorch_model.bin": b"\x80\x04."}), 400),
        "traversal": (tar_bytes({f"../../{k}": v for k, v in files.items()}), 400),
        "absolute": (tar_bytes({f"/abs/{k}": v for k, v in files.items()}), 400),
        "symlink": (tar_bytes(files, links={"evil": "/etc/passwd"}), 400),
        "not an archive": (b"hello world" * 50, 400),
        "empty": (b"", 400),
    }
    manifest = json.loads(files["adapter.json"])
    for label, change in {
        "labels as a dict": lambda m: m.update(labels={"neg": 0, "pos": 1}),
        "meta not an object": lambda m: m.update(meta=5),
        "format_version text": lambda m: m.update(format_version="abc"),
        "config a string": lambda m: m.update(config="lora"),
        "r as text": lambda m: m["config"].update(r="4"),
        "huge head": lambda m: (m.update(labels=None), m.update(head={"num_labels": 3_000_000})),
        "huge rank": lambda m: m["config"].update(r=50000),
        "negative head": lambda m: (m.update(labels=None), m.update(head={"num_labels": -1})),
        "a list": lambda m: (m.clear(), m.update(x=[1])),
    }.items():
        hostile = json.loads(json.dumps(manifest))
        change(hostile)
        body = json.dumps(list(hostile.values()) if label == "a list" else hostile).encode()
        bad[label] = (tar_bytes({**files, "adapter.json": body}), 422)
    before = client.post("/v1/classify", json={"adapter": "sent", "inputs": ["x"]}, headers=ACME).json()
    for label, (data, status) in bad.items():
        r = client.put("/v1/adapters/sent", content=data, headers={**ACME, "content-type": "application/x-tar"})
        assert r.status_code == status, (label, r.text)
        assert r.json()["error"]["message"]
        now = client.post("/v1/classify", json={"adapter": "sent", "inputs": ["x"]}, headers=ACME).json()
        assert now["version"] == before["version"] and close(scores(now), scores(before)), label
    assert engine.store.versions("acme", "sent") == [before["version"]]  # nothing left behind
    r = client.put("/v1/adapters/bad name!", content=src["s0.tar.gz"].read_bytes(), headers=ACME)
    assert r.status_code in (400, 404)
    r = client.put("/v1/adapters/other", files={"wrong": ("a", b"x")}, headers=ACME)
    assert r.status_code == 400


def test_metrics(client):
    client.post("/v1/classify", json={"adapter": "sent", "inputs": ["x"]}, headers=ACME)
    text = client.get("/metrics", headers=ADMIN).text
    assert 'adapterkit_requests_total{adapter="acme/sent",route="/v1/classify",status="200"}' in text
    for name in ("adapterkit_errors_total", "adapterkit_request_latency_seconds_bucket", "adapterkit_batch_size_bucket",
                 "adapterkit_queue_depth", "adapterkit_cache_hits_total", "adapterkit_cache_misses_total",
                 "adapterkit_cache_evictions_total", "adapterkit_loaded_adapters", "adapterkit_loaded_adapter_bytes",
                 "adapterkit_adapter_load_seconds_bucket"):
        assert name in text, name


def test_concurrent_http_requests_while_adapters_are_replaced(engine, src, reference):
    """Many adapters served concurrently over HTTP while two of them get new versions."""
    for i in range(3):
        engine.store.add("acme", f"c{i}", src[f"s{i}"])
    app = create_app(engine, KEYS)
    texts = ["a b c", "hello there", "we like tea"]

    async def run() -> list[tuple[str, str, dict]]:  # 8 clients in a loop, one uploader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=ACME, timeout=60) as c:
            rng = random.Random(0)

            done = asyncio.Event()
            answers: list[tuple[str, str, dict]] = []

            async def ask() -> None:
                extra = 3
                while extra:
                    extra -= done.is_set()
                    name, text = rng.choice(["c0", "c1", "c2", "sent"]), rng.choice(texts)
                    r = await c.post("/v1/classify", json={"adapter": name, "inputs": [text]})
                    assert r.status_code == 200, r.text
                    answers.append((name, text, r.json()))

            async def replace() -> None:
                for step in range(4):
                    name, source = f"c{step % 2}", src[f"s{(step + 1) % 3}.tar.gz"]
                    r = await c.put(f"/v1/adapters/{name}", content=source.read_bytes(),
                                    headers={"content-type": "application/gzip"})
                    assert r.status_code == 201, r.text
                    await asyncio.sleep(0.02)
                done.set()

            await asyncio.gather(replace(), *(ask() for _ in range(8)))
            return answers

    answers = asyncio.run(run())
    assert {out["version"] for name, _, out in answers if name in ("c0", "c1")} >= {1, 2, 3}
    for name, text, out in answers:
        folder = engine.store.path("acme", name, out["version"])
        assert close(scores(out), reference.scores(folder, text)), (name, out["version"])


def test_oversized_json_body(engine):
    with TestClient(create_app(engine, max_json_bytes=1000)) as c:
        r = c.post("/v1/classify", json={"inputs": ["x" * 2000]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert c.post("/v1/classify", json={"inputs": ["x"]}).status_code == 200


def test_single_tenant_server_needs_no_key(engine):
    with TestClient(create_app(engine)) as c:
        assert c.post("/v1/classify", json={"inputs": ["x"]}).status_code == 200
        assert c.get("/v1/adapters").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_without_keys_only_loopback(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(SystemExit, match="loopback"):
        serve_command("unused", str(tmp_path), host="0.0.0.0")


def test_tar_helper_roundtrip():
    data = tar_bytes({"a.txt": b"hi"})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("a.txt").read() == b"hi"


def test_the_key_is_checked_before_the_body_is_read_and_bodies_are_bounded_on_the_stream(engine):
    app = create_app(engine, KEYS, max_json_bytes=1 << 20)
    sent = []

    def chunks(n):
        for i in range(n):  # 64 chunks of 64 kB, sent chunked (no Content-Length)
            sent.append(i)
            yield b"x" * (64 << 10)

    with TestClient(app) as c:
        r = c.post("/v1/classify", content=chunks(64), headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert len(sent) < 64  # the server answered without taking the body


def test_a_chunked_body_is_cut_off_at_the_limit(engine):
    from adapterkit.serve.middleware import BodyLimitMiddleware

    async def app(scope, receive, send):
        raise AssertionError("the app ran with an oversized body")

    pulled, sent = [], []

    async def chunked():  # 64 chunks of 64 kB and no Content-Length
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * (64 << 10), "more_body": len(pulled) < 64}

    async def send(message):
        sent.append(message)

    door = BodyLimitMiddleware(app, max_json=1 << 20)
    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}
    asyncio.run(asyncio.wait_for(door(scope, chunked, send), 10))
    assert sent[0]["status"] == 413 and len(pulled) == 17  # 17 × 64 kB: the first read past 1 MB


def test_errors_keep_the_envelope(client, engine):
    r = client.post("/v1/classify", content=b'{"inputs": ["\xff\xfe"]}', headers={**ACME, "content-type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json() and "detail" not in r.json()
    r = client.post("/v1/classify", content=b'{"inputs": ["a\\ud800b"]}',
                    headers={**ACME, "content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"prompt": "hi", "stream": True}, headers=ACME)
    assert r.status_code == 400 and "causal-LM" in r.json()["error"]["message"]
    r = client.get("/v1/adapters", params={"tenant": "../../etc"}, headers=ADMIN)
    assert r.status_code == 400 and "not a path" in r.json()["error"]["message"]
    r = client.get("/v1/nowhere", headers=ACME)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_body_that_stalls_times_out(engine):
    from adapterkit.serve.middleware import BodyLimitMiddleware

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app ran without a body")

    async def stalled():
        await asyncio.sleep(30)

    sent = []

    async def send(message):
        sent.append(message)

    door = BodyLimitMiddleware(app, body_timeout_s=0.2)
    scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}
    asyncio.run(asyncio.wait_for(door(scope, stalled, send), 10))
    assert sent[0]["status"] == 408


def test_a_backtracking_target_pattern_in_an_upload_is_never_run(client, src, monkeypatch):
    """The freeze of issue 15: install attaches to the file's own list of sites, looked up by name."""
    import adapterkit.targets

    def no_matching(*args, **kwargs):
        raise AssertionError("a target pattern from an upload was matched")

    monkeypatch.setattr(adapterkit.targets, "find_sites", no_matching)
    monkeypatch.setattr("adapterkit.build.find_sites", no_matching)
    files = {f.name: f.read_bytes() for f in src["s2"].iterdir()}
    manifest = json.loads(files["adapter.json"])
    manifest["config"]["targets"] = ["re:(.|\\w)*Q"]
    data = tar_bytes({**files, "adapter.json": json.dumps(manifest).encode()})
    r = client.put("/v1/adapters/regex", content=data, headers={**ACME, "content-type": "application/x-tar"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/classify", json={"adapter": "regex", "inputs": ["fine"]}, headers=ACME)
    assert r.status_code == 200
    assert client.delete("/v1/adapters/regex", headers=ACME).status_code == 200


def test_put_bodies_are_bounded_too(engine):
    with TestClient(create_app(engine, KEYS, max_json_bytes=1000, max_upload_bytes=10_000)) as c:
        r = c.put("/v1/adapters/x", content=json.dumps({"source": "y" * 5000}),
                  headers={**ACME, "content-type": "application/json"})
        assert r.status_code == 413
        r = c.put("/v1/adapters/x", content=(b"x" * 4096 for _ in range(600)),
                  headers={**ACME, "content-type": "application/x-tar"})
        assert r.status_code == 413
        r = c.put("/v1/adapters/x", files={"file": ("a.tar", b"x" * (3 << 20))}, headers=ACME)
        assert r.status_code == 413
