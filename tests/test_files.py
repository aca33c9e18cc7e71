"""Adapter files: round trips, the manifest, and every way a file can be wrong, missing or half-written."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import adapterkit as ak
from adapterkit.config import FORMAT_VERSION
from adapterkit.io import read_adapter

from .conftest import make_cnn, make_gpt2, make_llama, randomize


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _cnn_with(name="a", cfg=None, labels=None):
    am = ak.adapt(make_cnn())
    am.add(name, cfg or ak.LoRA(r=2), labels=labels)
    randomize(am, name)
    return am


def _out(am, x, name):
    am.activate(name)
    with torch.no_grad():
        out = am(**x) if isinstance(x, dict) else am(x)
    return out.logits if hasattr(out, "logits") else out


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("single_file", [False, True])
def test_round_trip_minilm_with_head_and_labels(make_minilm, minilm_inputs, tmp_path, single_file):
    am = ak.adapt(make_minilm())
    am.add("sent", ak.LoRA(r=4), labels=["neg", "neu", "pos", "mixed"])
    randomize(am, "sent")
    expected = _out(am, minilm_inputs, "sent")
    path = tmp_path / ("sent.safetensors" if single_file else "sent")
    am.save("sent", path)

    other = ak.adapt(make_minilm())
    assert other.load(path) == "sent"
    got = _out(other, minilm_inputs, "sent")
    assert got.shape == (4, 4) and torch.equal(got, expected)
    assert other.adapter("sent").meta["labels"] == ["neg", "neu", "pos", "mixed"]
    assert other.adapter_info("sent")["head"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "cfg",
    [ak.Bottleneck(bottleneck_size=3), ak.Bottleneck(placement="parallel"), ak.IA3(), ak.BitFit(),
     ak.LoRA(r=3, rslora=True, targets=[nn.Conv2d])],
    ids=["bottleneck", "parallel", "ia3", "bitfit", "lora_by_class"],
)
@pytest.mark.parametrize("single_file", [False, True])
def test_round_trip_every_method(tmp_path, cfg, single_file):
    am = _cnn_with("m", cfg, labels=["x", "y"])
    x = torch.randn(2, 3, 16, 16)
    expected = _out(am, x, "m")
    path = tmp_path / ("m.safetensors" if single_file else "m")
    am.save("m", path)
    other = ak.adapt(make_cnn())
    assert other.load(path, name="copy") == "copy"
    assert torch.equal(_out(other, x, "copy"), expected)
    assert other.adapter("copy").config.method == cfg.method


def test_round_trip_gpt2_input_side_ia3_and_combined_meta(tmp_path):
    am = ak.adapt(make_gpt2())
    am.add("a", ak.IA3())
    am.add("b", ak.IA3())
    randomize(am, "a")
    randomize(am, "b")
    am.combine("ab", {"a": 0.5, "b": 0.5})
    x = torch.randint(0, 100, (2, 5))
    expected = _out(am, x, "ab")
    am.save("ab", tmp_path / "ab")
    other = ak.adapt(make_gpt2())
    other.load(tmp_path / "ab")
    assert torch.equal(_out(other, x, "ab"), expected)
    assert other.adapter("ab").meta["combined_from"] == {"a": 0.5, "b": 0.5}
    assert other.site_names("ab") == am.site_names("ab")


def test_manifest_contents(make_minilm, tmp_path):
    am = ak.adapt(make_minilm())
    am.add("sent", ak.Bottleneck(placement="houlsby", reduction=32), labels=["neg", "pos"])
    am.save("sent", tmp_path / "sent")
    assert sorted(p.name for p in (tmp_path / "sent").iterdir()) == ["adapter.json", "adapter.safetensors"]
    manifest = json.loads((tmp_path / "sent" / "adapter.json").read_text())
    assert manifest["format"] == "adapterkit" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["name"] == "sent"
    assert manifest["config"]["method"] == "bottleneck" and manifest["config"]["placement"] == "houlsby"
    assert manifest["base"] == {"name": am.base_name, "fingerprint": am.fingerprint()}
    assert "all-MiniLM" in am.base_name or "minilm" in am.base_name.lower()
    assert manifest["head"] == {"path": "classifier", "num_labels": 2}
    assert manifest["labels"] == ["neg", "pos"]
    assert len(manifest["sites"]) == 12 and manifest["params"] == am.adapter_info("sent")["params"]

    am.save("sent", tmp_path / "sent.safetensors")
    with safe_open(str(tmp_path / "sent.safetensors"), "pt") as handle:
        single = json.loads(handle.metadata()["adapterkit"])
        keys = set(handle.keys())
    assert single == manifest
    assert keys == set(am.adapter_state_dict("sent"))
    assert any(k.startswith("head.") for k in keys) and all(k.startswith(("sites.", "head.")) for k in keys)


def test_fingerprint_ignores_head_and_values_but_not_shapes(make_minilm):
    a = ak.adapt(make_minilm())
    other = make_minilm()
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight.add_(1.0)
        other.classifier = nn.Linear(384, 7)
    assert ak.adapt(other).fingerprint() == a.fingerprint()
    assert ak.adapt(make_cnn(width=4)).fingerprint() != ak.adapt(make_cnn()).fingerprint()


# --- refusing bad files -----------------------------------------------------------------------


def test_load_on_a_different_base_names_the_adapter(tmp_path):
    am = ak.adapt(make_gpt2())
    am.add("mine", ak.LoRA(r=2))
    am.save("mine", tmp_path / "mine")
    llama = ak.adapt(make_llama())
    with pytest.raises(ak.AdapterFileError, match=r"adapter 'mine'.*trained on base"):
        llama.load(tmp_path / "mine")
    assert llama.adapters == []
    narrow = ak.adapt(make_cnn(width=4))
    _cnn_with("c").save("c", tmp_path / "c.safetensors")
    with pytest.raises(ak.AdapterFileError, match="adapter 'c'"):
        narrow.load(tmp_path / "c.safetensors")
    # Skipping the base check still cannot load mismatched tensors, and leaves nothing behind.
    from adapterkit.io.files import load_adapter

    with pytest.raises(ak.AdapterFileError, match=r"adapter 'c'.*shape"):
        load_adapter(narrow, tmp_path / "c.safetensors", check_base=False)
    assert narrow.adapters == [] and len(narrow.sites) == 0


@pytest.mark.parametrize("single_file", [False, True])
def test_truncated_safetensors(tmp_path, single_file):
    am = _cnn_with()
    path = tmp_path / ("a.safetensors" if single_file else "a")
    am.save("a", path)
    tensors = path if single_file else path / "adapter.safetensors"
    data = tensors.read_bytes()
    for cut in (len(data) // 2, 5):
        tensors.write_bytes(data[:cut])
        with pytest.raises(ak.AdapterFileError, match="truncated or not a safetensors file"):
            ak.adapt(make_cnn()).load(path)


def test_truncated_or_bad_manifest(tmp_path):
    _cnn_with().save("a", tmp_path / "a")
    manifest = tmp_path / "a" / "adapter.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ak.AdapterFileError, match="truncated or not JSON"):
        ak.adapt(make_cnn()).load(tmp_path / "a")
    manifest.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ak.AdapterFileError, match="not an adapterkit manifest"):
        ak.adapt(make_cnn()).load(tmp_path / "a")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ak.AdapterFileError, match="without an adapterkit header"):
        ak.adapt(make_cnn()).load(tmp_path / "plain.safetensors")


def test_missing_files(tmp_path):
    am = ak.adapt(make_cnn())
    for missing in (tmp_path / "nope", tmp_path / "nope.safetensors"):
        with pytest.raises(ak.AdapterFileError, match="no such adapter"):
            am.load(missing)
    _cnn_with().save("a", tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").unlink()
    with pytest.raises(ak.AdapterFileError, match="adapter.safetensors is missing"):
        am.load(tmp_path / "a")
    _cnn_with("b").save("b", tmp_path / "b")
    (tmp_path / "b" / "adapter.json").unlink()
    with pytest.raises(ak.AdapterFileError, match="adapter.json is missing"):
        am.load(tmp_path / "b")
    assert am.adapters == []


def test_pickle_files_are_refused(tmp_path):
    am = _cnn_with()
    for suffix in (".bin", ".pt"):
        with pytest.raises(ak.AdapterFileError, match="never pickle"):
            am.save("a", tmp_path / f"a{suffix}")
        assert not (tmp_path / f"a{suffix}").exists()
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.bin")
    with pytest.raises(ak.AdapterFileError, match="refusing a pickle"):
        am.load(tmp_path / "adapter.bin")
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ak.AdapterFileError, match="only pickle files"):
        am.load(folder)


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "adapter.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_unknown_method_is_an_error(tmp_path):
    _cnn_with().save("a", tmp_path / "a")
    _edit_manifest(tmp_path / "a", lambda m: m["config"].update(method="dora9000"))
    am = ak.adapt(make_cnn())
    with pytest.raises(ak.AdapterFileError, match=r"adapter 'a'.*unknown adapter method 'dora9000'"):
        am.load(tmp_path / "a")
    assert am.adapters == []


def test_newer_config_keys_and_format_load_with_a_warning(tmp_path):
    am = _cnn_with()
    x = torch.randn(2, 3, 16, 16)
    expected = _out(am, x, "a")
    am.save("a", tmp_path / "a")
    _edit_manifest(tmp_path / "a", lambda m: m["config"].update(quantum_rank=3, use_magic=True))
    other = ak.adapt(make_cnn())
    with pytest.warns(UserWarning, match=r"unknown keys \['quantum_rank', 'use_magic'\]"):
        other.load(tmp_path / "a")
    assert torch.equal(_out(other, x, "a"), expected)

    _edit_manifest(tmp_path / "a", lambda m: m.update(format_version=FORMAT_VERSION + 1, future_field={"x": 1}))
    with pytest.warns(UserWarning, match="newer adapterkit"):
        read_adapter(tmp_path / "a")


def test_duplicate_and_unknown_names(tmp_path):
    am = _cnn_with()
    am.save("a", tmp_path / "a")
    x = torch.randn(2, 3, 16, 16)
    before = _out(am, x, "a")
    with pytest.raises(ak.AdapterExistsError, match="'a'"):
        am.load(tmp_path / "a")
    assert torch.equal(_out(am, x, "a"), before) and am.adapters == ["a"]
    am.load(tmp_path / "a", name="a2")
    assert am.adapters == ["a", "a2"]
    with pytest.raises(ak.AdapterNotFoundError):
        am.save("zzz", tmp_path / "zzz")
    assert not (tmp_path / "zzz").exists()


# --- atomic writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("single_file", [False, True])
def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path, single_file):
    am = _cnn_with()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / ("a.safetensors" if single_file else "a")
    am.save("a", path)
    randomize(am, "a", seed=3)
    expected = _out(am, x, "a")
    am.save("a", path)  # overwrite
    assert _leftovers(tmp_path) == []
    other = ak.adapt(make_cnn())
    other.load(path)
    assert torch.equal(_out(other, x, "a"), expected)


def _interrupt(monkeypatch, func: str, on_call: int):
    """Make os.<func> raise on its `on_call`-th call (1-based), as a crash mid-write would."""
    real = getattr(os, func)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise OSError(f"simulated crash in os.{func}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, func, flaky)


@pytest.mark.parametrize(("single_file", "func", "on_call"),
                         [(True, "replace", 1), (False, "rename", 1), (False, "rename", 2)])
def test_interrupted_write_keeps_the_previous_version(tmp_path, monkeypatch, single_file, func, on_call):
    am = _cnn_with()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / ("a.safetensors" if single_file else "a")
    am.save("a", path)
    v1 = _out(am, x, "a")
    randomize(am, "a", seed=7)
    assert not torch.equal(_out(am, x, "a"), v1)
    with monkeypatch.context() as patch:
        _interrupt(patch, func, on_call)
        with pytest.raises(OSError, match="simulated crash"):
            am.save("a", path)
    assert _leftovers(tmp_path) == []
    other = ak.adapt(make_cnn())
    other.load(path)
    assert torch.equal(_out(other, x, "a"), v1)


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    am = _cnn_with()
    with monkeypatch.context() as patch:
        _interrupt(patch, "replace", 1)
        with pytest.raises(OSError):
            am.save("a", tmp_path / "a.safetensors")
    with monkeypatch.context() as patch:
        _interrupt(patch, "rename", 1)
        with pytest.raises(OSError):
            am.save("a", tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_save_does_not_warn(tmp_path):
    am = _cnn_with()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        am.save("a", tmp_path / "a")
        ak.adapt(make_cnn()).load(tmp_path / "a")
