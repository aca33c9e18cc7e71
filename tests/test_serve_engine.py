"""The serving engine from Python: batched answers equal lone ones, eviction, hot replacement."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import adapterkit as ak  # noqa: E402
from adapterkit.serve import Engine  # noqa: E402
from adapterkit.serve.base import length_groups  # noqa: E402
from adapterkit.serve.errors import BadRequest, NotFound, Overloaded, PayloadTooLarge  # noqa: E402

from .serving import Reference, load_minilm, make_adapter, minilm_path  # noqa: E402

TEXTS = ["the cat sat on the mat", "hello", "we like green tea a lot more than coffee", "it rained all day"]
NAMES = [f"a{i}" for i in range(6)]
ATOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two versions of each of six adapters (some with three labels)."""
    builder = ak.adapt(load_minilm())
    root = tmp_path_factory.mktemp("src")
    out = {}
    for i, name in enumerate(NAMES):
        labels = ["neg", "pos"] if i % 2 == 0 else ["x", "y", "z"]
        out[name] = [make_adapter(builder, name, root / f"{name}-v{v}", seed=10 * i + v, labels=labels, scale=0.3)
                     for v in (1, 2)]
    return out


@pytest.fixture(scope="module")
def reference(minilm_tokenizer):
    return Reference(ak.adapt(load_minilm()), minilm_tokenizer)


@pytest.fixture(scope="module")
def engine(folders, tmp_path_factory):
    eng = Engine(minilm_path(), tmp_path_factory.mktemp("store"), max_wait_ms=20, max_inputs=8)
    for name in NAMES:
        eng.store.add("default", name, folders[name][0])
    yield eng
    eng.close()


def assert_matches(answer: dict, expected: list[float], labels: list[str]) -> None:
    got = [answer["scores"][label] for label in labels]
    assert list(answer["scores"]) == labels
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < ATOL
    assert answer["label"] == labels[max(range(len(expected)), key=expected.__getitem__)]


def test_classify_equals_the_input_run_alone(engine, folders, reference):
    out = engine.classify(TEXTS, adapter="a1")
    assert out["adapter"] == "a1" and out["version"] == 1 and len(out["results"]) == len(TEXTS)
    for text, answer in zip(TEXTS, out["results"], strict=True):
        assert_matches(answer, reference.scores(folders["a1"][0], text), ["x", "y", "z"])


def test_concurrent_requests_for_many_adapters_and_the_base_share_batches(engine, folders, reference):
    engine.classify(["warm"], adapter="a0")
    before = _batch_totals(engine)
    rng = random.Random(0)
    plan = [(rng.choice([*NAMES, None]), rng.choice(TEXTS)) for _ in range(40)]
    futures = [engine.submit("classify", [text], adapter=name) for name, text in plan]
    answers = [f.result(timeout=60) for f in futures]
    after = _batch_totals(engine)
    rows, batches = after[0] - before[0], after[1] - before[1]
    assert rows == 40 and batches < 40  # requests were batched
    for (name, text), answer in zip(plan, answers, strict=True):
        folder = folders[name][0] if name else None
        labels = reference.labels(folder) if name else engine.base_labels
        assert answer["adapter"] == name
        assert_matches(answer["results"][0], reference.scores(folder, text), labels)


def _batch_totals(engine: Engine) -> tuple[float, float]:
    sample = engine.metrics.registry.get_sample_value
    return sample("adapterkit_batch_size_sum", {"kind": "encode"}), sample("adapterkit_batch_size_count", {"kind": "encode"})


def test_embed_with_and_without_adapter(engine, folders, reference):
    for name in ("a2", None):
        out = engine.embed(TEXTS[:2], adapter=name)
        assert len(out["vectors"]) == 2 and len(out["vectors"][0]) == 384
        for text, vector in zip(TEXTS[:2], out["vectors"], strict=True):
            expected = reference.embedding(folders[name][0] if name else None, text)
            assert max(abs(a - b) for a, b in zip(vector, expected, strict=True)) < ATOL
    normed = engine.embed(["x"], normalize=True)["vectors"][0]
    assert abs(sum(v * v for v in normed) - 1) < 1e-4


def test_length_groups():
    assert length_groups([8] * 32, 64) == [list(range(32))]
    groups = length_groups([5, 14, 6, 500, 7], 64)
    assert groups == [[0, 2, 4, 1], [3]]  # the long row goes alone instead of padding the others to 500


def test_one_long_input_among_short_ones(engine, folders, reference):
    long_text = " ".join(["word"] * 300)
    plan = [("a0", "hi"), ("a1", long_text), (None, "a cat"), ("a0", long_text[:40])]
    futures = [engine.submit("classify", [text], adapter=name) for name, text in plan]
    for (name, text), future in zip(plan, futures, strict=True):
        folder = folders[name][0] if name else None
        labels = reference.labels(folder) if name else engine.base_labels
        assert_matches(future.result(timeout=60)["results"][0], reference.scores(folder, text), labels)


def test_bad_requests(engine):
    with pytest.raises(NotFound):
        engine.classify(["x"], adapter="nope")
    with pytest.raises(NotFound):
        engine.classify(["x"], adapter="a0", tenant="globex")
    with pytest.raises(PayloadTooLarge):
        engine.classify(["x"] * 9, adapter="a0")
    with pytest.raises(PayloadTooLarge):
        engine.classify(["x" * 30_000])
    with pytest.raises(PayloadTooLarge, match="tokens"):
        engine.classify(["word " * 600])
    with pytest.raises(BadRequest):
        engine.classify([])
    with pytest.raises(BadRequest):
        engine.classify([3])  # type: ignore[list-item]
    with pytest.raises(BadRequest, match="causal"):
        engine.generate("hi")
    assert engine.classify(["still serving"], adapter="a0")["results"]


def test_cancelled_requests_release_their_adapter(engine):
    futures = [engine.submit("classify", [t], adapter="a3") for t in TEXTS * 4]
    for f in futures[::2]:
        f.cancel()
    for f in futures[1::2]:
        f.result(timeout=60)
    engine.classify(["flush"])
    assert not engine.batcher._pins


def test_eviction_under_a_small_byte_budget(folders, reference, tmp_path):
    with Engine(minilm_path(), tmp_path / "store") as probe:
        probe.store.add("default", "a0", folders["a0"][0])
        one = probe.preload("default", "a0").result(timeout=60)
        size = probe.cache.get(one).bytes
    with Engine(minilm_path(), tmp_path / "store", cache_bytes=int(2.5 * size), max_wait_ms=1) as eng:
        for name in NAMES[:4]:
            eng.store.add("default", name, folders[name][0])
        for name in [*NAMES[:4], "a0", "a1"]:
            answer = eng.classify([TEXTS[0]], adapter=name)["results"][0]
            folder = folders[name][0]
            assert_matches(answer, reference.scores(folder, TEXTS[0]), reference.labels(folder))
            stats = eng.stats()
            assert stats["loaded"] <= 2 and stats["bytes"] <= eng.cache.budget
        stats = eng.stats()
        assert stats["evictions"] >= 4 and stats["misses"] >= 6
        assert len(eng.am.adapters) == stats["loaded"]  # evicted adapters left the model


def test_a_slow_load_does_not_hold_up_other_adapters(engine, folders, monkeypatch):
    """Files are read off the model thread: requests for resident adapters keep being answered."""
    engine.store.add("default", "slow", folders["a5"][1])
    read = engine.batcher.read
    gate = threading.Event()

    def slow_read(key):
        if key.name == "slow":
            gate.wait(10)
        return read(key)

    monkeypatch.setattr(engine.batcher, "read", slow_read)
    engine.classify(["warm"], adapter="a2")
    cold = engine.submit("classify", ["x"], adapter="slow")
    start = time.monotonic()
    for _ in range(3):
        assert engine.classify(["meanwhile"], adapter="a2")["results"]
    assert time.monotonic() - start < 9 and not cold.done()
    gate.set()
    assert cold.result(timeout=60)["adapter"] == "slow"
    engine.delete("default", "slow")


def test_a_broken_file_in_the_store_fails_only_its_requests(engine, folders):
    engine.store.add("default", "broken", folders["a0"][0])
    path = engine.store.path("default", "broken", 1) / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    bad = engine.submit("classify", ["x"], adapter="broken")
    good = engine.submit("classify", ["x"], adapter="a4")
    with pytest.raises(Exception, match="truncated"):
        bad.result(timeout=60)
    assert good.result(timeout=60)["results"]
    engine.delete("default", "broken")


def test_answers_match_their_version_while_adapters_are_replaced(engine, folders, reference):
    """Clients hammer six adapters while another thread uploads new versions and rolls back."""
    stop = threading.Event()
    errors: list[BaseException] = []
    answers: list[tuple[str, str, dict]] = []
    # what each version holds: a rolled-back version's folder is deleted, its answers are still checked
    sources = {(name, engine.store.resolve("default", name)): engine.store.path(
        "default", name, engine.store.resolve("default", name)) for name in NAMES}
    for (name, version), path in list(sources.items()):
        sources[(name, version)] = Path(shutil.copytree(path, engine.store.root.parent / f"copy-{name}-{version}",
                                                        dirs_exist_ok=True))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                name, text = rng.choice(NAMES), rng.choice(TEXTS)
                answers.append((name, text, engine.classify([text], adapter=name)))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    def replacer() -> None:
        rng = random.Random(1)
        try:
            for step in range(12):
                name = rng.choice(NAMES)
                if step % 4 == 3:
                    try:
                        engine.rollback("default", name)
                    except Exception:  # noqa: BLE001 - nothing to roll back to
                        pass
                else:
                    version = engine.put("default", name, source=folders[name][step % 2])["version"]
                    sources[(name, version)] = folders[name][step % 2]
                time.sleep(0.01)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    replacing = threading.Thread(target=replacer)
    replacing.start()
    replacing.join(timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    versions = {(name, out["version"]) for name, _, out in answers}
    assert len(answers) > 20 and len(versions) > len(NAMES)
    for name, text, out in answers:
        assert out["adapter"] == name
        folder = sources[(name, out["version"])]  # exactly the version that answered
        assert_matches(out["results"][0], reference.scores(folder, text), reference.labels(folder))


def test_closed_engine_refuses_work(folders, tmp_path):
    eng = Engine(minilm_path(), tmp_path / "store")
    eng.close()
    with pytest.raises(Overloaded):
        eng.classify(["x"])


def test_an_adapter_with_its_own_module_copy_serves_beside_others(engine, folders, reference, tmp_path):
    builder = ak.adapt(load_minilm())
    folder = make_adapter(builder, "pooled", tmp_path / "pooled", seed=7, scale=0.3,
                          config=ak.LoRA(r=4, targets=["query", "value"],
                                         modules_to_save=["bert.encoder.layer.5.output.LayerNorm"]))
    engine.store.add("default", "pooled", folder)
    futures = [engine.submit("classify", [text], adapter=name)
               for text in TEXTS for name in ("pooled", "a0", None)]
    for future in futures:
        answer = future.result(timeout=60)
        name, text = answer["adapter"], TEXTS[futures.index(future) // 3]
        source = folder if name == "pooled" else folders[name][0] if name else None
        labels = reference.labels(source) if name else engine.base_labels
        assert_matches(answer["results"][0], reference.scores(source, text), labels)


def test_a_failing_row_fails_its_own_request_only():
    """Rows of several requests share one forward; one that raises must not fail the others."""
    from adapterkit.serve.batcher import Batcher, Request
    from adapterkit.serve.metrics import ServeMetrics

    class NoCache:
        def touch(self, key):
            return None

        def over_budget(self, pinned):
            return []

    def execute(kind, items):
        if any(req.rows[i] == [666] for req, i in items):
            raise KeyError("a label this adapter does not have")
        return [sum(req.rows[i]) for req, i in items]

    metrics = ServeMetrics()
    batcher = Batcher(NoCache(), lambda key: ({}, {}), execute, metrics, max_batch=64, max_wait_ms=200)
    try:
        good = [Request("classify", None, [[1, 2], [3]]) for _ in range(3)]
        bad = Request("classify", None, [[5], [666]])
        futures = [batcher.submit(r) for r in (good[0], bad, good[1], good[2])]
        assert [f.result(timeout=30) for f in (futures[0], *futures[2:])] == [[3, 3]] * 3
        with pytest.raises(KeyError, match="does not have"):
            futures[1].result(timeout=30)
        assert metrics.isolated_batches._value.get() >= 1
    finally:
        batcher.close()


def test_replaced_versions_leave_memory_once_drained(engine, folders):
    for version in range(3):
        engine.put("default", "churn", source=folders["a2"][version % 2])
        assert engine.submit("classify", ["x"], adapter="churn").result(timeout=60)["results"]
    live = engine.store.resolve("default", "churn")
    engine.batcher.call(lambda: None).result(timeout=60)  # one more turn of the model thread
    resident = [k.version for k in engine.cache.keys() if k.name == "churn"]
    assert resident == [live]
    engine.delete("default", "churn")
    engine.batcher.call(lambda: None).result(timeout=60)
    assert not [k for k in engine.cache.keys() if k.name == "churn"]


def test_uploads_run_niced_and_one_per_tenant_at_a_time(engine, folders, monkeypatch):
    import os
    import sys

    if sys.platform.startswith("linux"):
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        worker = engine._uploads.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        assert worker == min(19, own + 10)
    running, most = [0], [0]
    real = engine._put

    def counting(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(engine, "_put", counting)
    threads = [threading.Thread(target=engine.put, args=("t1", f"p{i}"), kwargs={"source": folders["a0"][0]})
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1
    assert {r["name"] for r in engine.adapters("t1")} == {"p0", "p1", "p2"}


def test_a_cpu_engine_runs_its_frozen_linear_layers_through_the_fast_kernel(engine):
    from torch import nn

    linears = [m for m in engine.am.base.modules() if type(m) is nn.Linear]
    assert linears and all("forward" in vars(m) for m in linears)  # methods/kernels.fast_linears


def test_a_cpu_engine_compiles_its_one_row_kernels_at_start_and_decodes_the_same_tokens_with_them(
        tmp_path, monkeypatch):
    import torch

    from adapterkit.methods import kernels

    from .serving import tiny_llama

    fresh = kernels.RowProduct()
    monkeypatch.setattr(kernels, "row_product", fresh)
    base = tiny_llama(tmp_path / "llama", hidden=512, layers=1)  # q/o 512x512 and the MLP: >= 2^18 elements
    # capture=False: one stream's steps are the eager ones here (a captured step compiles its own products)
    with Engine(base, tmp_path / "store", max_new_tokens=12, merge_after=0, capture=False) as engine:
        threads = torch.get_num_threads()
        assert {(torch.float32, 512, 512, threads), (torch.float32, 1024, 512, threads),
                (torch.float32, 512, 1024, threads)} <= set(fresh._kernels)  # before any request
        calls = [0]
        for key, kernel in list(fresh._kernels.items()):
            def counted(*args, kernel=kernel):
                calls[0] += 1
                return kernel(*args)
            fresh._kernels[key] = counted
        with_kernel = engine.generate("the cat", max_new_tokens=12, ignore_eos=True)["token_ids"]
        fresh.enabled = False
        without = engine.generate("the cat", max_new_tokens=12, ignore_eos=True)["token_ids"]
    assert fresh.failed is None and calls[0] >= 11 * 4  # every decode step: q, o and the MLP's three
    assert len(with_kernel) == 12 and with_kernel == without
