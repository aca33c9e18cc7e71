"""Routing stacks updated slot by slot (slots.py) and serving installs that refill an evicted record."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import adapterkit as ak
from adapterkit.slots import assign_slots


def test_assign_slots_keeps_places_and_fills_holes_first():
    assert assign_slots(None, ["a", "b", "c"]) == ["a", "b", "c"]
    assert assign_slots(["a", "b", "c"], ["a", "c", "d"]) == ["a", "d", "c"]
    assert assign_slots(["a", "b", "c"], ["a", "b"]) == ["a", "b"]  # a trailing hole is dropped
    assert assign_slots(["a", "b", "c"], ["c", "e"]) == ["e", None, "c"]


def _randomize(am, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(name):
            p.add_(0.5 * torch.randn(p.shape, generator=gen))


def test_routing_stays_exact_through_many_installs_and_evictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    am = ak.adapt(model, head=None)
    config = {"lora": ak.LoRA(r=4, targets=["0", "2"]), "ia3": ak.IA3(targets=["0", "2"]),
              "bitfit": ak.BitFit(targets=["0", "2"])}
    kinds = list(config)
    live: list[str] = []
    x = torch.randn(6, 16)
    stacks_seen = set()
    for step in range(30):
        name = f"a{step}"
        am.add(name, config[kinds[step % 3]])
        _randomize(am, name, step)
        live.append(name)
        if len(live) > 7:
            am.delete(live.pop(step % 5), collect=False)
        route = [live[(step + i) % len(live)] for i in range(5)] + [None]
        with torch.no_grad(), am.route(route):
            routed = am(x)
        for i, row_name in enumerate(route):
            am.activate(row_name)
            with torch.no_grad():
                torch.testing.assert_close(routed[i], am(x[i : i + 1])[0], rtol=1e-4, atol=1e-5)
        am.activate(None)
        stacks_seen.update(id(s) for site in am.sites.values() for s in site._stacks.values())
    # slots were rewritten in place: far fewer stacks were ever built than forwards that changed them
    assert len(stacks_seen) < 30 * 3


def test_deleting_frees_an_adapter_before_the_next_forward():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    am = ak.adapt(model, head=None)
    for name in ("a", "b"):
        am.add(name, ak.LoRA(r=2, targets=["0"]))
    with torch.no_grad(), am.route(["a", "b"]):
        am(torch.randn(2, 8))
    ref = weakref.ref(am.adapter("b").site_methods["0"])
    am.delete("b", collect=False)
    gc.collect()
    assert ref() is None  # the routing stack holds weak references only


def test_a_changed_adapter_is_rewritten_in_its_slot():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    am = ak.adapt(model, head=None)
    for i, name in enumerate(("a", "b")):
        am.add(name, ak.LoRA(r=2, targets=["0"]))
        _randomize(am, name, i)
    x = torch.randn(2, 8)
    with torch.no_grad(), am.route(["a", "b"]):
        am(x)
    _randomize(am, "b", 9)
    with torch.no_grad(), am.route(["a", "b"]):
        routed = am(x)
    am.activate("b")
    with torch.no_grad():
        torch.testing.assert_close(routed[1], am(x[1:])[0])


def test_a_full_cache_refills_the_evicted_record(tmp_path):
    """Installing into a full cache reuses an evicted adapter's record; answers equal a fresh engine's."""
    from adapterkit.serve import Engine

    from .serving import load_minilm, make_adapter, minilm_path

    builder = ak.adapt(load_minilm())
    folders = {f"r{i}": make_adapter(builder, f"r{i}", tmp_path / f"r{i}", seed=i, scale=0.3) for i in range(4)}
    one = Engine(minilm_path(), tmp_path / "one", max_wait_ms=1)
    tight = Engine(minilm_path(), tmp_path / "tight", max_wait_ms=1)
    try:
        for name, folder in folders.items():
            one.store.add("default", name, folder)
            tight.store.add("default", name, folder)
        tight.preload("default", "r0").result()
        size = tight.cache.stats()["bytes"]
        tight.cache.budget = int(2.5 * size)
        texts = ["good film", "a dull and slow story"]
        for name in ["r0", "r1", "r2", "r3", "r0", "r2"]:
            got = tight.classify(texts, adapter=name)["results"]
            want = one.classify(texts, adapter=name)["results"]
            assert [r["label"] for r in got] == [r["label"] for r in want]
            for a, b in zip(got, want, strict=True):
                assert all(abs(a["scores"][k] - b["scores"][k]) < 1e-4 for k in b["scores"])
        stats = tight.stats()
        assert stats["loaded"] <= 2 and stats["reused"] >= 3
        assert tight.cache.stats()["bytes"] == stats["loaded"] * size  # a refilled record counts as built
    finally:
        one.close()
        tight.close()


def test_a_decode_steps_rows_reuse_their_gathered_lora_weights_until_the_rows_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    am = ak.adapt(model, head=None)
    for i, name in enumerate(("a", "b", "c")):
        am.add(name, ak.LoRA(r=4, targets=["0"]))
        _randomize(am, name, i)
    stack = None

    def routed(route):
        nonlocal stack
        with torch.inference_mode(), am.route(route):
            out = am(torch.ones(len(route), 16))
        stack = next(iter(am.sites["0"]._stacks.values())).stacked
        return out

    first = routed(["a", "b"])
    kept = stack.gathered
    assert kept is not None and len(kept[0]) == 2  # each row's slot, with its A and B
    torch.testing.assert_close(routed(["a", "b"]), first)
    assert stack.gathered is kept  # the same rows: nothing gathered again
    routed(["b", "c"])
    assert stack.gathered is not kept and stack.gathered[0] != kept[0]  # other rows: gathered anew
    with torch.no_grad():
        am.adapter("b").methods_by_path["0"].lora_B.mul_(2)  # a changed adapter is rewritten in its slot
    again = routed(["b", "c"])
    am.activate("b")
    with torch.inference_mode():
        torch.testing.assert_close(again[0], am(torch.ones(1, 16))[0], rtol=1e-4, atol=1e-5)
