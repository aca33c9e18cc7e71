"""The Engine's captured one-stream decode step: the same tokens as the eager steps, for the base, a
LoRA through the slots and a merged adapter; everything else decodes eagerly; a failing step turns
itself off and the stream goes on."""

from __future__ import annotations

import logging

import pytest
import torch

import adapterkit as ak
from adapterkit.serve.captured import CapturedStep

from .serving import gpt2_builder, make_adapter, tiny_llama

pytest.importorskip("fastapi")

from adapterkit.serve import Engine  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "the cat sat on the mat and the dog"
NEW = 14


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("captured")
    base = tiny_llama(root / "llama", hidden=64, layers=2)
    builder = gpt2_builder(base)
    configs = {"lora": ak.LoRA(r=8, targets=ALL_LINEAR), "lora_qv": ak.LoRA(r=4, targets=["q_proj", "v_proj"]),
               "wide": ak.LoRA(r=32, targets=["q_proj"]), "other": ak.LoRA(r=8, targets=ALL_LINEAR),
               "bottleneck": ak.Bottleneck(reduction=4)}
    folders = {name: make_adapter(builder, name, root / name, config=config, labels=None, seed=i, scale=0.5)
               for i, (name, config) in enumerate(configs.items())}
    made = {"on": Engine(base, root / "on", max_new_tokens=NEW, merge_after=0, max_wait_ms=5),
            "off": Engine(base, root / "off", max_new_tokens=NEW, merge_after=0, max_wait_ms=5, capture=False),
            "merging": Engine(base, root / "merging", max_new_tokens=NEW, merge_after=1, max_wait_ms=5)}
    for engine in made.values():
        for name, folder in folders.items():
            engine.store.add("default", name, folder)
    yield made
    for engine in made.values():
        engine.close()


def _tokens(engine: Engine, adapter) -> list[int]:  # noqa: ANN001 - a name, a mixture or None
    return engine.generate(PROMPT, adapter=adapter, max_new_tokens=NEW, ignore_eos=True)["token_ids"]


def _steps(engine: Engine) -> int:
    return engine.stats()["captured_steps"]


@pytest.mark.parametrize("adapter", [None, "lora", "lora_qv"])
def test_one_stream_decodes_through_the_captured_step_with_the_eager_tokens(engines, adapter):
    on, off = engines["on"], engines["off"]
    assert on.health()["captured_step"] == "on" and off.health()["captured_step"] == "off"
    before = _steps(on)
    got = _tokens(on, adapter)
    assert _steps(on) - before == NEW - 1  # every step after the prefill's token
    assert got == _tokens(off, adapter) and len(got) == NEW
    if adapter is not None:
        assert got != _tokens(off, None)  # the adapter did act


def test_a_merged_adapter_rides_the_captured_step(engines):
    merging, off = engines["merging"], engines["off"]
    _tokens(merging, "other")  # another adapter first: a merge of "lora" then follows a switch
    before = _steps(merging)
    got = _tokens(merging, "lora")
    assert merging.merging is not None and merging.merging.merged is not None  # merged at its prefill
    assert _steps(merging) - before == NEW - 1
    assert got == _tokens(off, "lora")


def _rows_steps(engine: Engine) -> int:
    return sum(step.steps for step in engine.captured_steps if step.rows > 1)


def test_streams_with_their_own_adapters_share_a_captured_step_of_several_rows(engines):
    """Four streams at once, three LoRAs of two ranks and the base, each in its own row of the slots:
    the tokens of an engine without captured steps; with a stream whose adapter cannot ride (rank
    32), the rows decode eagerly while it runs, with the same tokens again."""
    on, off = engines["on"], engines["off"]
    assert on.health()["captured_rows"] == {"4": "on", "16": "on"}
    prompts = [PROMPT, "the cat sat", "the dog", "we like green tea a lot"]
    for adapters, rides in ((["lora", "lora_qv", None, "other"], True), (["lora", "wide", None, "other"], False)):
        before = _rows_steps(on)
        futures = [on.submit_generate(p, adapter=a, max_new_tokens=NEW, ignore_eos=True)
                   for p, a in zip(prompts, adapters, strict=True)]
        got = [f.result(timeout=120)["token_ids"] for f in futures]
        assert _rows_steps(on) > before or not rides
        assert got == [off.generate(p, adapter=a, max_new_tokens=NEW, ignore_eos=True)["token_ids"]
                       for p, a in zip(prompts, adapters, strict=True)]


@pytest.mark.parametrize("adapter", ["wide", "bottleneck", {"lora": 0.5, "other": 0.5}])
def test_what_the_slots_cannot_hold_decodes_eagerly(engines, adapter):
    """A rank over the slots' (32 > 16), a bottleneck (no low-rank form) and a mixture run the
    eager step, with the same tokens as an engine without a captured step."""
    on, off = engines["on"], engines["off"]
    before = _steps(on)
    got = _tokens(on, adapter)
    assert _steps(on) == before
    assert got == _tokens(off, adapter)


def test_a_failing_captured_step_turns_itself_off_and_the_stream_goes_on(engines, caplog):
    on, off = engines["on"], engines["off"]
    step = on.captured
    assert step is not None

    def broken(**kwargs):  # noqa: ANN003 - the compiled forward's keywords
        raise RuntimeError("the compiled graph failed")

    forwards = step._forwards
    step._forwards = [broken] * len(forwards)
    try:
        with caplog.at_level(logging.WARNING, logger="adapterkit.serve.captured"):
            got = _tokens(on, "lora")
        assert got == _tokens(off, "lora")  # the failing step and the rest ran eagerly
        assert "RuntimeError: the compiled graph failed" in on.health()["captured_step"]
        assert sum("captured decode step is off" in r.getMessage() for r in caplog.records) == 1
    finally:
        step._forwards, step.off = forwards, None


def test_the_captured_step_keeps_to_what_it_was_built_for(engines, monkeypatch):
    step = engines["on"].captured
    assert step is not None and step.rows == 1
    assert step.applies([None])
    assert not step.applies([None, None])  # one row's step
    monkeypatch.setattr(step, "column", step.capacity - 1)
    assert step.has_room([0])
    monkeypatch.setattr(step, "column", step.capacity)
    assert not step.has_room([0])  # no room for the next token in the fixed cache
    assert not step.applies([{"lora": 1.0}]) and not step.applies(["not-loaded"])
    assert not step.applies(["wide"]) and not step.applies(["bottleneck"])
    monkeypatch.setattr(step, "_threads", torch.get_num_threads() + 1)
    assert not step.applies([None])  # its kernels were compiled for another thread count


def test_an_engine_without_a_causal_lm_or_with_capture_off_has_no_captured_step(tmp_path):
    from .serving import minilm_path

    with Engine(minilm_path(), tmp_path / "store") as engine:
        assert engine.captured is None and engine.health()["captured_step"] == "off"


def test_low_rank_forms_equal_the_adapters_outputs():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    am = ak.adapt(model)
    am.add("lora", ak.LoRA(r=4, alpha=8, targets=["0"]))
    am.add("dora", ak.DoRA(r=4, targets=["0"]))
    method = am.adapter("lora").site_methods[next(iter(am.adapter("lora").site_methods))]
    with torch.no_grad():
        method.lora_B.normal_()
    x, h = torch.randn(3, 12), torch.randn(3, 10)
    form = method.low_rank()
    assert form is not None
    a, b = form
    torch.testing.assert_close(h + x @ a.T @ b.T, method.reference(x, h))
    dora = next(iter(am.adapter("dora").site_methods.values()))
    assert dora.low_rank() is None  # its magnitude rescales the whole weight: no added product


def test_capture_needs_a_fixed_cache_the_model_has(tmp_path):
    """A model transformers cannot give a StaticCache (no config) is refused at construction."""
    from torch import nn

    am = ak.adapt(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever transformers raises for it
        CapturedStep(am, capacity=8)


def test_a_bf16_base_passes_the_check_and_decodes_through_the_captured_step(tmp_path):
    """Half precision rounds differently in the compiled graph (fused products, fp32 accumulation):
    within the half-precision tolerance, not the fp32 one, and the stream goes through it."""
    base = tiny_llama(tmp_path / "llama", hidden=64, layers=2)
    with Engine(base, tmp_path / "store", max_new_tokens=NEW, merge_after=0, dtype="bf16") as engine:
        assert engine.health()["captured_step"] == "on"
        assert len(_tokens(engine, None)) == NEW and _steps(engine) == NEW - 1


def test_a_slot_rank_under_one_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="capture_rank"):
        Engine(tmp_path / "no-such-model", tmp_path / "store", capture_rank=0)


def test_fixed_cache_lengths_grow_from_the_first_to_the_capacity():
    from adapterkit.serve.captured import cache_lengths

    assert cache_lengths(2048) == (256, 1024, 2048)
    assert cache_lengths(512) == (256, 512)
    assert cache_lengths(256) == (256,)
    assert cache_lengths(100) == (100,)
