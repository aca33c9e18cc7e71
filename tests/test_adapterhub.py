"""AdapterHub (`adapters` library) interop against fixtures the real library made
(tests/fixtures/adapterhub/make_fixtures.py): same outputs, same files, clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.io.adapterhub import export_adapterhub, load_adapterhub, read_adapterhub

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
SUPPORTED = ["seq_bn", "double_seq_bn", "par_bn", "lora", "seq_bn_ln_after_false"]
ATOL = 1e-5


def read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))  # str: older safetensors releases take no Path


def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))


def base_model():
    from transformers import BertConfig, BertModel

    config = BertConfig.from_json_file(FIXTURES / "base" / "config.json")
    config._attn_implementation = "eager"
    model = BertModel(config).eval()
    state = {k.removeprefix("bert."): v for k, v in read(FIXTURES / "base" / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


@pytest.fixture(scope="module")
def recorded():
    return read(FIXTURES / "inputs.safetensors"), read(FIXTURES / "outputs.safetensors")


@pytest.fixture
def am():
    return ak.adapt(base_model())


def output(am, setup, inputs) -> torch.Tensor:
    am.activate(setup)
    with torch.no_grad():
        return am(**inputs).last_hidden_state


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_config(folder: Path, **changes) -> Path:
    data = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if key.startswith("top_"):
            data[key[4:]] = value
        else:
            data["config"][key] = value
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder


def test_fixtures_are_small_and_pickle_free_but_one():
    files = [p for p in FIXTURES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    assert [p.relative_to(FIXTURES).as_posix() for p in files if p.suffix == ".bin"] == [
        "seq_bn_pickle/pytorch_adapter.bin"]


def test_the_base_model_matches_the_library_run(am, recorded):
    inputs, outputs = recorded
    torch.testing.assert_close(output(am, None, inputs), outputs["base"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", SUPPORTED)
def test_library_adapters_give_the_library_outputs(am, recorded, name):
    inputs, outputs = recorded
    assert load_adapterhub(am, FIXTURES / name) == name
    got = output(am, name, inputs)
    torch.testing.assert_close(got, outputs[name], atol=ATOL, rtol=0)
    assert (got - outputs["base"]).abs().max() > 1e-2  # the adapter's weights are not the identity's


def test_manifest_is_ours_and_says_where_it_came_from(am):
    manifest, tensors = read_adapterhub(FIXTURES / "seq_bn", am)
    assert manifest["format"] == "adapterkit" and manifest["name"] == "seq_bn"
    assert manifest["base"]["fingerprint"] is None and manifest["head"] is None and manifest["labels"] is None
    assert manifest["meta"]["imported_from"]["format"] == "adapterhub"
    assert manifest["meta"]["imported_from"]["version"] == "adapters.1.3.0"
    config = ak.methods.config_from_dict(manifest["config"])
    assert isinstance(config, ak.Bottleneck) and config.renorm and config.reduction == 4
    assert manifest["sites"] == {f"encoder.layer.{i}.output.LayerNorm": "output" for i in range(2)}
    assert sorted(tensors) == sorted(f"sites.encoder.layer.{i}.output.LayerNorm.{p}.{t}"
                                     for i in range(2) for p in ("down", "up") for t in ("weight", "bias"))
    assert manifest["params"] == sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("name, sites", [
    ("double_seq_bn", [f"encoder.layer.{i}.{b}.dense" for i in range(2) for b in ("attention.output", "output")]),
    ("lora", [f"encoder.layer.{i}.{m}" for i in range(2)
              for m in ("attention.self.query", "attention.self.value", "output.dense")]),
    ("seq_bn_ln_after_false", ["encoder.layer.0.output.LayerNorm"]),  # leave_out [1]
])
def test_each_config_lands_on_its_sites(am, name, sites):
    manifest, _ = read_adapterhub(FIXTURES / name, am)
    assert sorted(manifest["sites"]) == sorted(sites)
    config = manifest["config"]
    if name == "double_seq_bn":
        assert config["activation"] == "silu" and not config["renorm"]
    if name == "seq_bn_ln_after_false":
        assert config["activation"] == "gelu" and config["scaling"] == 0.5 and not config["renorm"]
    if name == "lora":
        assert (config["r"], config["alpha"]) == (4, 8)


@pytest.mark.parametrize("name", SUPPORTED)
def test_export_writes_the_library_files_and_reads_back_the_same(am, recorded, tmp_path, name):
    inputs, _ = recorded
    load_adapterhub(am, FIXTURES / name)
    before = output(am, name, inputs)
    out = export_adapterhub(am, name, tmp_path / name)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    theirs, ours = read(FIXTURES / name / "adapter.safetensors"), read(out / "adapter.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    their_config = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    our_config = json.loads((out / "adapter_config.json").read_text())
    assert our_config == their_config  # every field, the method config's defaults included

    load_adapterhub(am, out, name="again")
    torch.testing.assert_close(output(am, "again", inputs), before, atol=0, rtol=0)


def test_a_model_with_a_head_reads_and_writes_prefixed_paths(recorded, tmp_path):
    from transformers import BertForSequenceClassification

    inputs, outputs = recorded
    base = base_model()
    with_head = BertForSequenceClassification(base.config).eval()
    with_head.bert.load_state_dict(base.state_dict())
    am = ak.adapt(with_head)
    load_adapterhub(am, FIXTURES / "seq_bn")
    assert sorted(am.site_names("seq_bn")) == [f"bert.encoder.layer.{i}.output.LayerNorm" for i in range(2)]
    am.activate("seq_bn")
    with torch.no_grad():
        torch.testing.assert_close(with_head.bert(**inputs).last_hidden_state, outputs["seq_bn"], atol=ATOL, rtol=0)
    out = export_adapterhub(am, "seq_bn", tmp_path / "seq_bn")
    theirs = read(FIXTURES / "seq_bn" / "adapter.safetensors")
    assert sorted(read(out / "adapter.safetensors")) == sorted(f"bert.{k}" for k in theirs)
    assert json.loads((out / "adapter_config.json").read_text())["model_class"] == "BertForSequenceClassification"


def test_am_load_tells_adapterhub_folders_apart(am, recorded):
    inputs, outputs = recorded
    assert am.load(str(FIXTURES / "double_seq_bn")) == "double_seq_bn"
    torch.testing.assert_close(output(am, "double_seq_bn", inputs), outputs["double_seq_bn"], atol=ATOL, rtol=0)


def test_parallel_adapters_land_on_the_blocks_residual_input(am):
    manifest, tensors = read_adapterhub(FIXTURES / "par_bn", am)
    assert manifest["sites"] == {f"encoder.layer.{i}.output": "input" for i in range(2)}
    assert sorted(tensors) == sorted(f"sites.encoder.layer.{i}.output.{p}.{t}"
                                     for i in range(2) for p in ("down", "up") for t in ("weight", "bias"))
    config = ak.methods.config_from_dict(manifest["config"])
    assert (config.input_arg, config.scaling, config.reduction, config.is_parallel) == (1, 4.0, 4, False)


def test_parallel_adapter_computes_the_librarys_equation(am):
    """BertOutput(x, r) = LN(dropout(dense(x)) + r); par_bn: LN(d + r + s·up(relu(down(r))))."""
    load_adapterhub(am, FIXTURES / "par_bn")
    block = am.base.encoder.layer[0].output
    adapter = am.adapter("par_bn").methods_by_path["encoder.layer.0.output"]
    x, r = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    with torch.no_grad():
        d = block.dense(x)
        expected = block.LayerNorm(d + r + 4.0 * adapter.up(torch.relu(adapter.down(r))))
        am.activate("par_bn")
        torch.testing.assert_close(block(x, r), expected)
        torch.testing.assert_close(block(x, input_tensor=r), expected)  # by keyword too
        am.activate(None)
        torch.testing.assert_close(block(x, r), block.LayerNorm(d + r))


def test_parallel_adapters_without_the_blocks_norm_are_refused(am, tmp_path):
    folder = edit_config(copy_fixture("par_bn", tmp_path), original_ln_after=False)
    with pytest.raises(ak.AdapterFileError, match=r"original_ln_after=False with is_parallel=True"):
        load_adapterhub(am, folder)
    assert am.adapters == []


@pytest.mark.parametrize("target", ["", "pytorch_adapter.bin"])
def test_pickle_weights_are_refused_with_how_to_convert(am, target):
    with pytest.raises(ak.AdapterFileError) as err:
        load_adapterhub(am, FIXTURES / "seq_bn_pickle" / target)
    message = str(err.value)
    assert "pickle" in message and "weights_only=True" in message and "save_file" in message
    assert "adapter.safetensors" in message
    assert am.adapters == []


@pytest.mark.parametrize("changes, match", [
    ({"ln_after": True}, r"ln_after=True"),
    ({"use_gating": True}, r"use_gating=True"),
    ({"scaling": "learned"}, r"scaling='learned'"),
    ({"non_linearity": "leakyrelu"}, r"non_linearity='leakyrelu'"),
    ({"phm_layer": True}, r"phm_layer=True"),
    ({"residual_before_ln": "post_add"}, r"residual_before_ln='post_add'"),
    ({"original_ln_after": False}, r"original_ln_after=False"),
    ({"reduction_factor": {"0": 4, "default": 8}}, r"reduction_factor=.*per-layer"),
    ({"architecture": "prefix_tuning"}, r"architecture 'prefix_tuning'"),
    ({"top_hidden_size": 64}, r"hidden size 64"),
    ({"top_model_type": "gpt2"}, r"'gpt2' model"),
])
def test_configs_adapterkit_cannot_compute_are_refused(am, tmp_path, changes, match):
    folder = edit_config(copy_fixture("seq_bn", tmp_path), **changes)
    with pytest.raises(ak.AdapterFileError, match=match):
        load_adapterhub(am, folder)
    assert am.adapters == []


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, r"use_dora=True"),
    ({"composition_mode": "scale"}, r"composition_mode='scale'"),
    ({"vera_d": 0.1}, r"vera_d=0.1"),
])
def test_lora_variants_are_refused(am, tmp_path, changes, match):
    with pytest.raises(ak.AdapterFileError, match=match):
        load_adapterhub(am, edit_config(copy_fixture("lora", tmp_path), **changes))


def test_tensors_that_do_not_fit_leave_the_model_as_it_was(am, tmp_path):
    folder = copy_fixture("seq_bn", tmp_path)
    tensors = read(folder / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith("adapter_up.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    write(tensors, folder / "adapter.safetensors")
    with pytest.raises(ak.AdapterFileError, match="shape"):
        load_adapterhub(am, folder)
    assert am.adapters == [] and not am.sites


def test_tensors_of_another_adapter_or_module_are_refused(am, tmp_path):
    folder = copy_fixture("seq_bn", tmp_path)
    tensors = read(folder / "adapter.safetensors")
    write({k.replace("layer.1.output", "layer.7.output"): v for k, v in tensors.items()},
              folder / "adapter.safetensors")
    with pytest.raises(ak.AdapterFileError, match="does not have"):
        load_adapterhub(am, folder)
    edit_config(folder, top_name="other")
    with pytest.raises(ak.AdapterFileError, match="not a bottleneck tensor of adapter 'other'"):
        load_adapterhub(am, folder)


def test_loader_fixups_of_older_files(am, tmp_path):
    # no version: written before `adapters`; its loader reads "gelu" as the tanh approximation
    folder = edit_config(copy_fixture("seq_bn_ln_after_false", tmp_path), top_version=None)
    with pytest.raises(ak.AdapterFileError, match="gelu_new"):
        load_adapterhub(am, folder)
    # adapters < 1.1 scaled LoRA by 1 whatever alpha said
    folder = edit_config(copy_fixture("lora", tmp_path), top_version="adapters.1.0.1")
    manifest, _ = read_adapterhub(folder, am)
    assert (manifest["config"]["r"], manifest["config"]["alpha"]) == (4, 4)


def test_export_refuses_what_adapterhub_cannot_express(am, tmp_path):
    am.add("par", ak.Bottleneck(placement="parallel", bottleneck_size=4))
    am.add("attn_lora", ak.LoRA(targets=["attention.output.dense"]))
    am.add("rs", ak.LoRA(rslora=True))
    am.add("first_arg", ak.Bottleneck(placement="custom", targets=[r"re:layer\.\d+\.output$"], input_arg=0))
    am.add("uneven", ak.Bottleneck(placement="custom", bottleneck_size=2, renorm=True,
                                   targets=["encoder.layer.0.output.LayerNorm", "encoder.layer.1.attention.output.LayerNorm"]))
    for name, match in (("par", "input_arg=1 at the block"), ("attn_lora", "not at a place"), ("rs", "rsLoRA"),
                        ("uneven", "different layers"), ("first_arg", "input_arg=0")):
        with pytest.raises(ak.CompositionError, match=match):
            export_adapterhub(am, name, tmp_path / name)
        assert not (tmp_path / name).exists()


# --- the renorm placement itself ------------------------------------------------------------------


def test_renorm_equals_its_equation_and_routes(am, recorded):
    inputs, _ = recorded
    targets = [r"re:layer\.\d+\.output\.LayerNorm$"]
    for i, name in enumerate(("a", "b")):
        am.add(name, ak.Bottleneck(placement="custom", targets=targets, renorm=True, bottleneck_size=3 + i))
        with torch.no_grad():
            for p in am.adapter_parameters(name):
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    site = am.adapter("a").methods_by_path["encoder.layer.0.output.LayerNorm"]
    x = torch.randn(2, 5, 32)
    h = site.norm(x)
    expected = site.norm(x + site.scaling * site.up(torch.relu(site.down(h))))
    torch.testing.assert_close(site(x, h), expected)
    torch.testing.assert_close(site.reference(x, h), expected)
    assert "norm.weight" not in dict(site.state_dict())  # the frozen norm is read, not owned

    a, b, base = output(am, "a", inputs), output(am, "b", inputs), output(am, None, inputs)
    am.activate(None)
    with torch.no_grad(), am.route(["b", None]):
        routed = am(**inputs).last_hidden_state
    torch.testing.assert_close(routed[0], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[1], base[1], atol=1e-6, rtol=0)
    assert (a - b).abs().max() > 1e-2


def test_renorm_needs_a_serial_layernorm_site(am):
    with pytest.raises(ak.AdapterConfigError, match="renorm"):
        ak.Bottleneck(placement="parallel", renorm=True).validate()
    with pytest.raises(ak.TargetError, match="LayerNorm"):
        am.add("x", ak.Bottleneck(placement="custom", targets=["output.dense"], renorm=True))
    assert ak.Bottleneck().to_dict()["renorm"] is False
