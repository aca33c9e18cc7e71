"""Installs of hostile or broken manifests: a clear AdapterFileError naming the field, nothing
allocated from a user-given size, no user pattern run, and the model left exactly as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.errors import AdapterFileError
from adapterkit.io import install
from adapterkit.train.memory import PeakMemory


@pytest.fixture(scope="module")
def saved(tmp_path_factory, _minilm_master):
    folder = tmp_path_factory.mktemp("hostile") / "good"
    donor = ak.adapt(copy.deepcopy(_minilm_master))
    donor.add("good", ak.LoRA(r=2), labels=["neg", "pos"])
    donor.save("good", folder)
    return json.loads((folder / "adapter.json").read_text()), load_file(folder / "adapter.safetensors")


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


HOSTILE = {
    "a backtracking target regex": (lambda m: m["config"].update(targets=["re:(.|\\w)*Q"]), None),
    "labels as a dict": (lambda m: m.update(labels={"neg": 0, "pos": 1}), "'labels'"),
    "a label twice": (lambda m: m.update(labels=["neg", "neg"]), "twice"),
    "meta not an object": (lambda m: m.update(meta=5), "'meta'"),
    "config as a string": (lambda m: m.update(config="lora"), "'config'"),
    "r as a string": (lambda m: m["config"].update(r="4"), "'config'"),
    "a huge rank": (lambda m: m["config"].update(r=50000), "the config makes"),
    "a huge head": (lambda m: (m.update(labels=None), m["head"].update(num_labels=3_000_000)), "no head tensor"),
    "a negative head": (lambda m: (m.update(labels=None), m["head"].update(num_labels=-1)), "'head.num_labels'"),
    "sites not a map": (lambda m: m.update(sites=["a"]), "'sites'"),
    "a site that is not a module": (lambda m: m["sites"].update({"bert.nowhere": "output"}), "no module"),
    "the manifest a list": (lambda m: (m.clear(), m.update(__list__=True)), "JSON object"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifests_fail_cleanly(case, saved, make_minilm):
    change, message = HOSTILE[case]
    manifest, tensors = copy.deepcopy(saved[0]), dict(saved[1])
    change(manifest)
    if manifest.pop("__list__", False):
        manifest = [manifest]
    model = make_minilm()
    am = ak.adapt(model)
    hooks = _hooks(model)
    with PeakMemory(interval_s=0.002) as mem:
        if message is None:  # the saved sites are used; the pattern in the config is never matched
            assert install(am, manifest, tensors, name="x", source="upload") == "x"
            am.delete("x")
        else:
            with pytest.raises(AdapterFileError, match=message):
                install(am, manifest, tensors, name="x", source="upload")
    assert am.adapters == [] and len(am.sites) == 0 and _hooks(model) == hooks
    assert mem.peak_rss_delta < 200 * 1024**2  # a 3M-label head or r=50000 would take GBs


def test_non_finite_weights_are_refused(saved, make_minilm):
    manifest, tensors = copy.deepcopy(saved[0]), dict(saved[1])
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    am = ak.adapt(make_minilm())
    with pytest.raises(AdapterFileError, match="NaN or infinite"):
        install(am, manifest, tensors, name="x", source="upload")
    assert am.adapters == []


def test_finite_values_that_overflow_the_records_dtype_are_refused(saved, make_minilm):
    """A float64 file's 1e300 is finite, but infinite once copied into the float32 record, also when
    the record of an adapter built alike is reused (io/install.py `reuse`)."""
    from adapterkit.io.install import prepare

    manifest, tensors = copy.deepcopy(saved[0]), {k: v.double() for k, v in saved[1].items()}
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key][0, 0] = 1e300
    am = ak.adapt(make_minilm())
    with pytest.raises(AdapterFileError, match="NaN or infinite"):
        install(am, manifest, tensors, name="x", source="upload")
    assert am.adapters == []
    spare = prepare(am, copy.deepcopy(saved[0]), dict(saved[1]), name="spare")
    with pytest.raises(AdapterFileError, match="NaN or infinite"):
        prepare(am, manifest, tensors, name="x", reuse=spare)
    assert am.adapters == []


def test_the_saved_sites_are_the_ones_attached(saved, make_minilm):
    manifest, tensors = copy.deepcopy(saved[0]), dict(saved[1])
    manifest["config"]["targets"] = ["key"]  # the file's sites say query and value
    am = ak.adapt(make_minilm())
    install(am, manifest, tensors, name="x")
    assert sorted(am.site_names("x")) == sorted(manifest["sites"])
    for key, t in tensors.items():
        assert torch.equal(am.adapter_state_dict("x")[key], t)


@pytest.mark.parametrize("field, value", [("alpha", "16"), ("r", True), ("rslora", "yes"), ("targets", [1, 2]),
                                          ("exclude", "re:.*"), ("dropout", None)])
def test_config_fields_of_the_wrong_type_are_named(field, value, saved, make_minilm):
    manifest, tensors = copy.deepcopy(saved[0]), dict(saved[1])
    manifest["config"][field] = value
    am = ak.adapt(make_minilm())
    with pytest.raises(AdapterFileError, match=f"field {field!r} must be"):
        install(am, manifest, tensors, name="x")
    assert am.adapters == []


def test_an_overflowing_rank_and_labels_in_meta_are_refused_or_ignored(saved, make_minilm):
    am = ak.adapt(make_minilm())
    manifest, tensors = copy.deepcopy(saved[0]), dict(saved[1])
    manifest["config"]["r"] = 10**30
    with pytest.raises(AdapterFileError):
        install(am, manifest, tensors, name="x")
    manifest = copy.deepcopy(saved[0])
    manifest["meta"] = {"labels": 5, "task": "sentiment"}
    install(am, manifest, tensors, name="y")
    assert am.adapter("y").meta["labels"] == ["neg", "pos"] and am.adapter("y").meta["task"] == "sentiment"


def test_the_base_fingerprint_is_the_full_precision_identity(make_minilm):
    """The same weights in fp16 keep the identity (adapters load on a half or quantized copy, issue 29);
    another shape does not."""
    am = ak.adapt(make_minilm())
    before = am.fingerprint()
    am.half()
    assert am.fingerprint() == before
    am.base.resize_token_embeddings(am.base.config.vocab_size + 8)
    assert am.fingerprint() != before
