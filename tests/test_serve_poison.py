"""A hostile tenant, round two: poisoned merges, adapters that cannot answer, strict parsing, what
errors tell, and unmerging bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.methods.lora import LoRAAdapter  # noqa: E402
from adapterkit.serve import create_app  # noqa: E402
from adapterkit.serve.errors import NonFiniteOutput, Redactor  # noqa: E402

from .serving import engine_with, load_minilm, make_adapter, tar_bytes  # noqa: E402

TEXTS = ["the cat sat on the mat", "what a lovely day", "it rained all day"]
KEYS = {"key-acme-0001": {"tenant": "acme"}, "key-globex-001": {"tenant": "globex"}}
ACME = {"X-API-Key": "key-acme-0001", "content-type": "application/x-tar"}
GLOBEX = {"X-API-Key": "key-globex-001"}


def _edited(folder, tmp, name, manifest_change=None, tensor_change=None):
    """A copy of an adapter folder with its manifest and/or tensors changed."""
    out = tmp / name
    out.mkdir()
    manifest = json.loads((folder / "adapter.json").read_text())
    tensors = load_file(folder / "adapter.safetensors")
    if manifest_change:
        manifest_change(manifest)
    if tensor_change:
        tensor_change(tensors)
    (out / "adapter.json").write_text(json.dumps(manifest))  # json writes NaN as the literal NaN
    save_file(tensors, out / "adapter.safetensors")
    return out


def _files(folder) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _overflow(tensors):
    for key in tensors:
        if key.endswith("lora_B"):
            tensors[key] = torch.full_like(tensors[key], 1e38)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    builder = ak.adapt(load_minilm())
    root = tmp_path_factory.mktemp("poison")
    good = {f"good{i}": make_adapter(builder, f"good{i}", root / f"good{i}", seed=i, scale=0.3) for i in range(2)}
    source = good["good0"]
    return {
        **good,
        "overflow": _edited(source, root, "overflow", tensor_change=_overflow),
        "nan_alpha": _edited(source, root, "nan_alpha", lambda m: m["config"].update(alpha=float("nan"))),
        "huge_alpha": _edited(source, root, "huge_alpha", lambda m: m["config"].update(alpha=1e7)),
        "int8": _edited(source, root, "int8", tensor_change=lambda t: t.update(
            {k: v.to(torch.int8) for k, v in t.items() if k.endswith("lora_A")})),
        "format_99": _edited(source, root, "format_99", lambda m: m.update(format_version=99)),
    }


def test_a_poisoned_adapter_is_never_merged_and_fails_only_its_own_rows(folders, tmp_path):
    """The adapter of issue 34 (finite lora_B of 1e38, overflowing): placed in the store by hand (an
    upload refuses it), then asked 12 times in a row with merging on."""
    with engine_with({"good0": folders["good0"], "good1": folders["good1"], "bad": folders["overflow"]},
                     tmp_path / "store", merge_after=2, max_wait_ms=50) as engine:
        before = {n: engine.classify(TEXTS, adapter=n)["results"] for n in ("good0", "good1", None)}
        weights = {k: v.clone() for k, v in engine.am.base.state_dict().items()}
        for _ in range(12):
            with pytest.raises(NonFiniteOutput):
                engine.classify(["x"], adapter="bad")
        assert not engine.am.state.merged and "default__bad__v1" in engine.merging.refused
        assert engine.stats()["merges_refused"] == 1 and engine.stats()["merges"] == 0
        assert all(torch.equal(v, engine.am.base.state_dict()[k]) for k, v in weights.items())
        # in one batch beside it, the other rows answer as they do alone
        futures = [engine.submit("classify", [t], adapter=n) for t in TEXTS for n in ("bad", "good0", None)]
        for i, future in enumerate(futures):
            if i % 3 == 0:
                with pytest.raises(NonFiniteOutput):
                    future.result(timeout=60)
            else:
                assert future.result(timeout=60)["results"]
        after = {n: engine.classify(TEXTS, adapter=n)["results"] for n in ("good0", "good1", None)}
        for name in before:
            for a, b in zip(before[name], after[name], strict=True):
                assert a["label"] == b["label"] and max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) < 1e-5


def test_a_merge_that_changes_answers_is_undone_bit_for_bit(folders, tmp_path, monkeypatch):
    """A merge whose merged output differs from the routed one (here: a merge that adds the delta
    twice) must fail its probe check, leave the base exactly as it was and never be tried again."""
    with engine_with({"good0": folders["good0"]}, tmp_path / "store", merge_after=2) as engine:
        weights = {k: v.clone() for k, v in engine.am.base.state_dict().items()}
        alone = engine.classify(TEXTS, adapter="good0")["results"]
        original = LoRAAdapter.merge_into

        def twice(self, module):
            original(self, module)
            original(self, module)

        monkeypatch.setattr(LoRAAdapter, "merge_into", twice)
        for _ in range(5):
            again = engine.classify(TEXTS, adapter="good0")["results"]
            assert all(a["label"] == b["label"] for a, b in zip(alone, again, strict=True))
        assert engine.merging.merges == 0 and "differs" in engine.merging.refused["default__good0__v1"]
        assert all(torch.equal(v, engine.am.base.state_dict()[k]) for k, v in weights.items())


def test_a_merge_whose_originals_cannot_be_kept_is_never_made(folders, tmp_path):
    with engine_with({"good0": folders["good0"]}, tmp_path / "store", merge_after=2, merge_copy_bytes=1024) as engine:
        for _ in range(4):
            engine.classify(TEXTS, adapter="good0")
        assert engine.merging.merges == 0 and not engine.am.state.merged
        assert "over the 1024 kept" in engine.merging.refused["default__good0__v1"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["lora", "ia3", "bitfit"]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_unmerge_restores_the_base_bit_for_bit(method, scale, seed):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    am = ak.adapt(base, head=None)
    config = {"lora": ak.LoRA(r=4, targets=["0", "2"]), "ia3": ak.IA3(targets=["0", "2"]),
              "bitfit": ak.BitFit(targets=["0", "2"])}[method]
    am.add("a", config)
    with torch.no_grad():
        for p in am.adapter_parameters("a"):
            p.add_(scale * torch.randn_like(p))
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    am.merge("a", keep_original=True)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in weights.items())
    am.unmerge("a")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in weights.items())
    am.merge("a", keep_original=True)
    am.delete("a", collect=False)  # a delete unmerges the same way
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in weights.items())


def test_keep_original_needs_nothing_else_merged():
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    am = ak.adapt(base, head=None)
    am.add("a", ak.LoRA(r=2, targets=["0"]))
    am.add("b", ak.LoRA(r=2, targets=["0"]))
    am.merge("a")
    with pytest.raises(ak.CompositionError, match="no other adapter merged"):
        am.merge("b", keep_original=True)


@pytest.fixture(scope="module")
def served(folders, tmp_path_factory):
    engine = engine_with({}, tmp_path_factory.mktemp("served"), merge_after=8)
    engine.store.add("globex", "victim", folders["good1"])
    with TestClient(create_app(engine, KEYS)) as client:
        yield engine, client
    engine.close()


@pytest.mark.parametrize(("case", "status", "words"), [
    ("overflow", 422, "NaN or infinite"),
    ("nan_alpha", 422, "finite number"),
    ("huge_alpha", 422, "at most"),
    ("int8", 422, "int8"),
    ("format_99", 422, "format_version 99"),
])
def test_adapters_that_cannot_answer_are_refused_at_upload(served, folders, case, status, words):
    engine, client = served
    loaded = list(engine.am.adapters)
    r = client.put(f"/v1/adapters/{case}", content=tar_bytes(_files(folders[case])), headers=ACME)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert engine.am.adapters == loaded and engine.store.versions("acme", case) == []  # nothing half-built
    assert client.post("/v1/classify", json={"adapter": "victim", "inputs": ["x"]}, headers=GLOBEX).status_code == 200


def test_booleans_are_json_booleans(served):
    _, client = served
    r = client.post("/v1/embed", json={"adapter": "victim", "inputs": ["x"], "normalize": "yes"}, headers=GLOBEX)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.post("/v1/embed", json={"adapter": "victim", "inputs": ["x"], "normalize": True}, headers=GLOBEX)
    assert r.status_code == 200


def test_errors_name_what_was_sent_not_where_it_is_kept(served, folders, monkeypatch):
    engine, client = served
    root = str(engine.store.root.resolve())
    no_manifest = tar_bytes({"adapter.safetensors": (folders["good0"] / "adapter.safetensors").read_bytes()})
    r = client.put("/v1/adapters/z", content=no_manifest, headers=ACME)
    assert r.status_code >= 400 and root not in r.text and str(engine.store.root) not in r.text
    r = client.put("/v1/adapters/z", json={"source": "nowhere"}, headers={"X-API-Key": "key-acme-0001"})
    assert r.status_code == 404 and "'nowhere'" in r.text and root not in r.text

    def broken(*args, **kwargs):
        raise RuntimeError(f"{root}/acme/secret/v1 exploded")

    monkeypatch.setattr(engine, "submit", broken)
    with TestClient(create_app(engine, KEYS), raise_server_exceptions=False) as c:
        r = c.post("/v1/classify", json={"adapter": "victim", "inputs": ["x"]}, headers=GLOBEX)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and root not in r.text


def test_the_redactor_names_uploads_and_versions(tmp_path):
    redact = Redactor(tmp_path / "store", base=str(tmp_path / "models" / "base"))
    store = str((tmp_path / "store").resolve())
    assert redact(f"{store}/.staging/abc123/adapter: truncated") == "the upload: truncated"
    assert redact(f"{store}/acme/z/v2: not an adapter folder") == "adapter 'z' v2: not an adapter folder"
    assert redact(f"{tmp_path}/models/base/config.json missing") == "the base model missing"


def test_a_put_that_loses_a_race_with_delete_gets_409(served, folders, monkeypatch):
    engine, client = served
    assert client.put("/v1/adapters/flip", content=tar_bytes(_files(folders["good0"])), headers=ACME).status_code == 201
    reserve = engine.store.reserve

    def then_deleted(tenant, name, folder):  # the DELETE lands between the reserve and the read
        version = reserve(tenant, name, folder)
        engine.store.delete(tenant, name)
        return version

    monkeypatch.setattr(engine.store, "reserve", then_deleted)
    r = client.put("/v1/adapters/flip", content=tar_bytes(_files(folders["good0"])), headers=ACME)
    assert r.status_code == 409 and "deleted while" in r.json()["error"]["message"], r.text
    monkeypatch.undo()
    assert client.put("/v1/adapters/flip", content=tar_bytes(_files(folders["good0"])), headers=ACME).status_code == 201
