"""A method defined outside the package works everywhere once registered: add, activate, route,
merge, combine, save and load. Nothing in adapterkit asks which method an adapter is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.config import MethodConfig
from adapterkit.methods import register
from adapterkit.methods.base import RouteStack, SiteMethod, broadcast_features, broadcast_rows

from .test_routing import check_rows


@dataclass
class Shift(MethodConfig):
    """h' = f(x) + s·v, v a learned vector per site (zero at first)."""

    method: ClassVar[str] = "test-shift"
    scale: float = 2.0


@dataclass
class ShiftStack(RouteStack):
    v: torch.Tensor  # [N+1, features]: s·v per slot, zeros in the last


class ShiftAdapter(SiteMethod):
    mergeable = True

    def __init__(self, config: Shift, shape) -> None:
        super().__init__(shape)
        self.scale = config.scale
        self.v = nn.Parameter(torch.zeros(shape.out_features))

    @classmethod
    def build(cls, config, shape, module, on_input=False):
        return cls(config, shape)

    def forward(self, x, h):
        return h + self.scale * broadcast_features(self.v, h, self.shape)

    def check_merge(self, module, module_name):
        if getattr(module, "bias", None) is None:
            raise ak.TargetError("no bias to shift")

    @torch.no_grad()
    def merge_into(self, module):
        module.bias += self.scale * self.v

    @torch.no_grad()
    def unmerge_from(self, module):
        module.bias -= self.scale * self.v

    @classmethod
    def combined_config(cls, configs):
        return dataclasses.replace(configs[0], scale=1.0)

    @torch.no_grad()
    def fill_combined(self, parts):
        self.v.copy_(sum(w * p.scale * p.v for p, w in parts))

    @classmethod
    def stack(cls, adapters):
        shifts = [a.scale * a.v for a in adapters]
        return ShiftStack(torch.stack(shifts + [torch.zeros_like(shifts[0])]))

    @classmethod
    def route(cls, stacked, rows, x, h, shape, inplace=False):
        return h + broadcast_rows(stacked.v[rows], h, shape)


register(Shift, ShiftAdapter)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def shifted(am: ak.AdaptedModel, name: str, seed: int) -> None:
    with torch.no_grad():
        for p in am.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))


def test_a_registered_method_works_like_a_built_in_one(tmp_path):
    am = ak.adapt(mlp(), head=None)
    am.add("a", Shift(targets=["0", "2"]))
    am.add("b", Shift(targets=["0", "2"], scale=0.5))
    x = torch.randn(5, 6)
    with torch.no_grad():
        base = am(x)
        am.activate("a")
        torch.testing.assert_close(am(x), base)  # the identity when added
    shifted(am, "a", 1)
    shifted(am, "b", 2)
    with torch.no_grad():
        ours = am(x)
        # the reference: the same sums written by hand on the plain layers (their hooks idle)
        m, v0, v2 = am.base, *(2.0 * s.adapters["a"].v for s in am.sites.values())
        am.activate(None)
        reference = m[4](torch.relu(m[2](torch.relu(m[0](x) + v0)) + v2))
    torch.testing.assert_close(ours, reference)

    check_rows(am, x, ["a", "b", None, "b", "a"])  # per-row routing through its stack/route

    am.activate("a")
    am.merge("a")
    with torch.no_grad():
        torch.testing.assert_close(am(x), ours, rtol=1e-5, atol=1e-6)
    am.unmerge("a")

    am.combine("mix", {"a": 0.3, "b": 0.7})
    with torch.no_grad():
        mixed = [s.adapters["mix"].v for s in am.sites.values()]
        want = [0.3 * 2.0 * s.adapters["a"].v + 0.7 * 0.5 * s.adapters["b"].v for s in am.sites.values()]
    for got, expected in zip(mixed, want, strict=True):
        torch.testing.assert_close(got, expected)

    am.save("a", tmp_path / "a")
    again = ak.adapt(mlp(), head=None)
    assert again.load(tmp_path / "a") == "a"
    again.activate("a")
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours)


def test_registration_errors():
    with pytest.raises(ak.AdapterConfigError, match="SiteMethod subclass"):
        register(Shift, nn.Linear)

    @dataclass
    class Clash(MethodConfig):
        method: ClassVar[str] = "lora"

    with pytest.raises(ak.AdapterConfigError, match="already registered"):
        register(Clash, ShiftAdapter)
    am = ak.adapt(mlp(), head=None)
    with pytest.raises(ak.TargetError, match="no default targets"):
        am.add("s", Shift())  # a new method has no default targets: it must name them
    assert am.adapters == []


def test_a_registered_method_is_served_uploaded_routed_merged_and_refused_by_peft_export(tmp_path):
    """The same custom method through `adapterkit serve`: uploaded over HTTP, routed per row beside
    another adapter and the base, then served merged; PEFT export names why it cannot."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from adapterkit.serve import Engine, create_app
    from adapterkit.train.saved import export_adapter

    from .serving import Reference, load_minilm, make_adapter, minilm_path, tar_bytes

    builder = ak.adapt(load_minilm())
    folders = {name: make_adapter(builder, name, tmp_path / name, config=Shift(targets=["query", "value"]),
                                  seed=seed, scale=0.3) for seed, name in enumerate(["s1", "s2"], start=1)}
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    reference = Reference(ak.adapt(load_minilm()), tokenizer)
    texts = ["a fine day", "the food was cold", "what a film"]

    def agrees(answer: dict, folder) -> bool:
        expected = reference.scores(folder, answer["text"])
        got = [answer["result"]["scores"][label] for label in ("neg", "pos")]
        return max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4

    with Engine(load_minilm(), tmp_path / "store", tokenizer=tokenizer, merge_after=3, max_wait_ms=50) as engine:
        with TestClient(create_app(engine)) as client:
            for name, folder in folders.items():
                body = tar_bytes({f.name: f.read_bytes() for f in folder.iterdir()})
                r = client.put(f"/v1/adapters/{name}", content=body, headers={"content-type": "application/x-tar"})
                assert r.status_code == 201 and r.json()["method"] == "test-shift", r.text
            # routed: one batch with rows for s1, s2 and the base
            futures = [(t, n, engine.submit("classify", [t], adapter=n)) for t in texts for n in ("s1", "s2", None)]
            for text, name, future in futures:
                result = future.result(timeout=60)["results"][0]
                if name is not None:
                    assert agrees({"text": text, "result": result}, folders[name]), (name, text)
            assert engine.merging.merges == 0
            for _ in range(4):  # one adapter's traffic: served merged (Shift folds into the biases)
                r = client.post("/v1/classify", json={"adapter": "s1", "inputs": [texts[0]]})
                assert r.status_code == 200 and agrees({"text": texts[0], "result": r.json()["results"][0]},
                                                       folders["s1"])
            assert engine.merging.merges == 1 and engine.am.state.merged
    with pytest.raises(ak.AdapterError, match="only LoRA adapters have a Hugging Face PEFT layout"):
        export_adapter(folders["s1"], tmp_path / "peft", "peft", minilm_path())


def test_model_level_methods_subclass_model_method():
    from torch import nn

    from adapterkit.errors import AdapterConfigError
    from adapterkit.methods import register
    from adapterkit.methods.base import ModelMethod
    from adapterkit.methods.prefix import PrefixTuningAdapter
    from adapterkit.methods.prompt import PromptTuningAdapter

    assert issubclass(PromptTuningAdapter, ModelMethod) and issubclass(PrefixTuningAdapter, ModelMethod)

    class Loose(nn.Module):  # has no declared prepare(): refused at registration, not at the first call
        pass

    with pytest.raises(AdapterConfigError, match="ModelMethod subclass"):
        register(ak.PromptTuning, Loose, model_level=True)
