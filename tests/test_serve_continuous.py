"""Continuous batching: rows join and leave a running decode at every step, each routed and sampled
on its own, and every row's tokens equal to the same request run alone."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import adapterkit as ak
from adapterkit.serve import captured as captured_module
from adapterkit.serve.captured import CapturedStep
from adapterkit.serve.decode import ContinuousDecoder
from adapterkit.serve.generate import GenerationRow, generate_batch

from .serving import WORDS, gpt2_builder, make_adapter, tiny_gpt2, tiny_llama

pytest.importorskip("fastapi")

from adapterkit.serve import Engine  # noqa: E402

EOS = 2  # "[EOS]" in the word-level tokenizer of serve.testing


def _adapted(folder, kind: str):
    am = gpt2_builder(folder)
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    for i in range(3):
        am.add(f"a{i}", ak.LoRA(r=4, targets=targets))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in am.adapter_parameters(f"a{i}"):
                p.add_(torch.randn(p.shape, generator=gen))
    am.eval()
    return am


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = tiny_gpt2(root / "m") if request.param == "gpt2" else tiny_llama(root / "m")
    return _adapted(folder, request.param)


def _requests(seed: int, n: int = 10) -> list[tuple[GenerationRow, str | None]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 3 + len(WORDS)) for _ in range(rng.randint(1, 9))]
        temperature = rng.choice([0.0, 0.0, 1.3])
        out.append((GenerationRow(prompt, rng.randint(1, 12), temperature, seed=rng.randrange(1000)),
                    rng.choice(["a0", "a1", "a2", None])))
    return out


def _alone(am, row: GenerationRow, name: str | None, eos: int | None) -> list[int]:
    return generate_batch(am, [GenerationRow(row.prompt, row.max_new_tokens, row.temperature, row.seed)], [name],
                          pad_id=1, eos_id=eos)[0].tokens


@pytest.fixture(scope="module")
def captured(model):
    """A captured one-stream step on the model (its adapters attached before it was compiled)."""
    step = CapturedStep(model, capacity=64, rank=8)
    step.build([5, 6, 7, 8, 9])
    assert step.off is None
    return step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_arrivals_equal_each_request_alone(model, seed):
    """Requests arrive in a random order at random steps; each one's tokens (greedy, or sampled with
    its own seed) are those of the request run alone."""
    _random_arrivals(model, seed, [])


@pytest.mark.parametrize("seed", [0, 3])
def test_random_arrivals_through_the_captured_step_equal_each_request_alone(model, captured, seed):
    """The same with a captured step, which takes every step where one row runs: rows move into its
    fixed cache and back as others join and leave, and no row's tokens change."""
    before = captured.steps
    _random_arrivals(model, seed, [captured])
    assert captured.steps > before, captured.off  # lone rows did go through it


def test_a_row_outgrowing_the_captured_cache_goes_on_eagerly(model, captured, monkeypatch):
    monkeypatch.setattr(captured, "capacity", 9)  # the rule only: positions 9 on run eagerly
    row = GenerationRow([5, 6, 7, 8], 12)
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: (row, "a1"), captured=[captured])
    decoder.admit([0])
    before, results = captured.steps, {}
    while decoder.running:
        results.update({i: out.tokens for i, out in decoder.step()})
    assert captured.steps - before == 5  # positions 4 to 8; then the keys and values moved back
    assert results[0] == _alone(model, row, "a1", None)


def test_rows_move_through_longer_fixed_caches_as_they_grow(model, monkeypatch):
    """With fixed caches of 8, 16, 32 and 40 tokens, a lone row starts in the shortest one that holds
    it and moves on as it grows (each length its own graph), and every row's tokens stay those of the
    request alone."""
    monkeypatch.setattr(captured_module, "FIRST_LENGTH", 8)
    monkeypatch.setattr(captured_module, "GROWTH", 2)
    step = CapturedStep(model, capacity=40, rank=8)
    step.build([5, 6, 7, 8, 9])
    assert step.off is None and step.lengths == (8, 16, 32, 40)
    row = GenerationRow([5, 6, 7, 8, 9, 10], 30)
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: (row, "a2"), captured=[step])
    decoder.admit([0])
    seen, results = set(), {}
    while decoder.running:
        results.update({i: out.tokens for i, out in decoder.step()})
        seen.add(step.lengths[step._at])
    assert seen == {8, 16, 32, 40} and step.steps == 29
    assert results[0] == _alone(model, row, "a2", None)
    _random_arrivals(model, 4, [step])


@pytest.fixture(scope="module")
def captured_rows(model, captured):
    """Captured steps of 2 and 4 rows beside the one-row step, over fixed caches of 8 to 24 tokens."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(captured_module, "FIRST_LENGTH", 8)
        patch.setattr(captured_module, "GROWTH", 2)
        steps = [CapturedStep(model, capacity=24, rank=8, rows=n) for n in (2, 4)]
    for step in steps:
        step.build([5, 6, 7, 8, 9])
        assert step.off is None and step.lengths == (8, 16, 24)
    return [captured, *steps]


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_random_arrivals_through_captured_steps_of_several_rows_equal_each_request_alone(model, captured_rows, seed):
    """Steps of up to 4 rows, each row routed to its own adapter through its slots: rows move into
    the smallest step that holds them, finish in their slots, move on to longer caches (cutting the
    columns no row reads at the longest) and back to the eager step when more rows run; no row's
    tokens change."""
    before = [step.steps for step in captured_rows]
    _random_arrivals(model, seed, captured_rows)
    assert sum(step.steps - b for step, b in zip(captured_rows[1:], before[1:], strict=True)) > 0


def test_rows_of_other_adapters_share_a_captured_step_in_their_own_slots(model, captured_rows):
    """Four rows, three adapters and the base, prompts of different lengths, all in the 4-row step
    from the first step to the last (rows of 20 tokens and more: the step moves them through the
    caches of 8, 16 and 24 tokens, cutting the columns of the finished rows on the way)."""
    step = captured_rows[2]
    requests = [(GenerationRow([5, 6, 7, 8, 9, 10, 11], 17), "a0"), (GenerationRow([8], 8), "a1"),
                (GenerationRow([9, 10, 5], 20), None), (GenerationRow([12, 13], 14), "a2")]
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: requests[i],
                                captured=captured_rows)
    decoder.admit([0, 1, 2, 3])
    before, results, seen = step.steps, {}, set()
    while decoder.running:
        rows = decoder.running
        results.update({i: out.tokens for i, out in decoder.step()})
        seen.add((rows > 2, step.lengths[step._at]))
    assert (True, 8) in seen and (True, 16) in seen
    for i, request in enumerate(requests):
        assert results[i] == _alone(model, *request, None), i
    assert step.steps - before >= 7


def test_at_the_longest_cache_the_columns_no_row_reads_are_cut(model, captured_rows):
    """With only the 2-row step: a short row leaves after 3 tokens, a long one started 5 columns after
    it goes on alone past the longest cache's 24 columns, through the same step (its first 5 columns,
    the finished row's only, are cut), with the tokens of the request alone."""
    step = captured_rows[1]
    requests = [(GenerationRow([5, 6, 7, 8, 9, 10], 3), "a0"), (GenerationRow([11], 22), "a1")]
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: requests[i], captured=[step])
    decoder.admit([0, 1])
    before, results, columns = step.steps, {}, []
    while decoder.running:
        results.update({i: out.tokens for i, out in decoder.step()})
        columns.append(step.column)
    assert step.steps - before == 21 and max(columns) == 24 and columns[-1] == 22  # 6 + 21 columns, 5 cut
    for i, request in enumerate(requests):
        assert results[i] == _alone(model, *request, None), i


def test_a_step_that_is_off_gives_way_to_the_next_larger(model, captured_rows, monkeypatch):
    """Two rows with the 2-row step off decode through the 4-row step, with the tokens alone."""
    two, four = captured_rows[1], captured_rows[2]
    monkeypatch.setattr(two, "off", "turned off by the test")
    requests = [(GenerationRow([5, 6, 7], 6), "a0"), (GenerationRow([8], 6), None)]
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: requests[i], captured=captured_rows)
    decoder.admit([0, 1])
    before, results = four.steps, {}
    while decoder.running:
        results.update({i: out.tokens for i, out in decoder.step()})
    assert four.steps - before == 5
    for i, request in enumerate(requests):
        assert results[i] == _alone(model, *request, None), i


def test_a_fixed_cache_whose_graph_gives_other_logits_keeps_the_step_off(model, monkeypatch):
    """Every fixed cache's graph is checked against the eager step at build: one wrong graph (here
    the second cache's, its logits shifted) turns the whole captured step off, saying which."""
    monkeypatch.setattr(captured_module, "FIRST_LENGTH", 8)
    monkeypatch.setattr(captured_module, "GROWTH", 2)
    own_code, made = captured_module._own_code, []

    def second_is_wrong(forward):
        decode = own_code(forward)
        made.append(decode)
        if len(made) != 2:
            return decode

        def shifted(**kwargs):
            out = decode(**kwargs)
            out.logits = out.logits + 1.0
            return out

        return shifted

    monkeypatch.setattr(captured_module, "_own_code", second_is_wrong)
    step = CapturedStep(model, capacity=16, rank=8)
    step.build([5, 6, 7, 8, 9])
    assert step.lengths == (8, 16) and step.off is not None and "over 16 cached tokens differ" in step.off


def _random_arrivals(model, seed: int, captured: list[CapturedStep]) -> None:
    requests = _requests(seed)
    rng = random.Random(100 + seed)
    order = rng.sample(range(len(requests)), len(requests))
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=EOS, describe=lambda i: requests[i], captured=captured)
    results: dict[int, list[int]] = {}
    widths, steps = [], 0
    while order or decoder.running:
        if order and (not decoder.running or rng.random() < 0.4):
            newcomers = [order.pop() for _ in range(min(len(order), rng.randint(1, 3)))]
            for i, out in decoder.admit(newcomers):
                results[i] = out.tokens
        for i, out in decoder.step():
            results[i] = out.tokens
        widths.append(decoder.running)
        steps += 1
        assert steps < 500
    assert sorted(results) == list(range(len(requests)))
    for i, (row, name) in enumerate(requests):
        assert results[i] == _alone(model, row, name, EOS), (i, row, name)
    assert max(widths) > 1  # rows really shared steps


def test_cancelled_rows_leave_and_the_others_go_on(model):
    requests = [(GenerationRow([5, 6, 7], 10), "a0"), (GenerationRow([8], 10), "a1"), (GenerationRow([9, 10], 10), None)]
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: requests[i])
    decoder.admit([0, 1])
    decoder.step()
    decoder.admit([2])
    decoder.step()
    assert decoder.drop(lambda i: i == 0) == [0] and decoder.running == 2
    cache_rows = {layer.keys.shape[0] for layer in decoder._cache.layers}
    assert cache_rows == {2}  # the cancelled row's keys and values are gone
    results = {}
    while decoder.running:
        results.update({i: out.tokens for i, out in decoder.step()})
    for i in (1, 2):
        assert results[i] == _alone(model, *requests[i], None)
    assert decoder.abort() == []


def test_a_failed_admission_leaves_the_running_rows_untouched(model):
    requests = {0: (GenerationRow([5, 6], 6), "a0"), 1: (GenerationRow([7], 6), "nonexistent")}
    decoder = ContinuousDecoder(model, pad_id=1, eos_id=None, describe=lambda i: requests[i])
    decoder.admit([0])
    with pytest.raises(Exception, match="nonexistent"):
        decoder.admit([1])
    results = {}
    while decoder.running:
        results.update({i: out.tokens for i, out in decoder.step()})
    assert results[0] == _alone(model, *requests[0], None)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    base = tiny_gpt2(root / "gpt2", positions=256)
    builder = gpt2_builder(base)
    folders = {f"g{i}": make_adapter(builder, f"g{i}", root / f"g{i}", config=ak.LoRA(r=4, targets=["c_attn"]),
                                     labels=None, seed=i, scale=1.0) for i in range(2)}
    made = {}
    for scheduling in ("continuous", "static"):
        engine = Engine(base, root / f"store-{scheduling}", max_wait_ms=5, max_new_tokens=200, scheduling=scheduling)
        for name, folder in folders.items():
            engine.store.add("default", name, folder)
        made[scheduling] = engine
    yield made
    for engine in made.values():
        engine.close()


def _newcomer(engine) -> tuple[int, int]:  # noqa: ANN001
    """(tokens the long request had made when a short one sent at its 3rd token finished, its total)."""
    seen, short, sent = [], [], threading.Event()

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == 3 and not sent.is_set():
            sent.set()
            future = engine.submit_generate("hello world", adapter="g1", max_new_tokens=4)
            future.add_done_callback(lambda _: short.append(len(seen)))

    # eos_id is the tiny model's own; a random model may stop early, so the prompt is checked below
    long = engine.submit_generate("the cat sat on", adapter="g0", max_new_tokens=150, on_token=on_token)
    out = long.result(timeout=120)
    if out["finish_reason"] == "stop" and out["tokens"] < 20:
        pytest.skip("the random model ended the long generation early")
    deadline = time.monotonic() + 30
    while not short and time.monotonic() < deadline:
        time.sleep(0.01)
    assert short, "the short request never finished"
    return short[0], out["tokens"]


def test_a_newcomer_joins_at_the_next_step_and_leaves_when_done(engines):
    """A short request sent while a long one decodes finishes while the long one still runs;
    static batching makes it wait for the whole long generation. (How many tokens the long one
    makes meanwhile depends on the machine's scheduling, 10 to 30 seen on 2 cores, so no tighter
    bound.)"""
    finished_at, total = _newcomer(engines["continuous"])
    assert finished_at < total
    engine = engines["continuous"]
    assert engine.batcher.decoder.running == 0 and not engine.batcher._pins
    finished_at, total = _newcomer(engines["static"])
    assert finished_at == total


def test_cancelling_frees_the_row(engines):
    engine = engines["continuous"]
    tokens, go = [], threading.Event()
    future = engine.submit_generate("the cat", adapter="g0", max_new_tokens=200,
                                    on_token=lambda t: (tokens.append(t), len(tokens) == 2 and go.set()))
    assert go.wait(60)
    future.cancel()
    deadline = time.monotonic() + 30
    while (engine.batcher.decoder.running or engine.batcher._pins) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher.decoder.running == 0 and not engine.batcher._pins
    assert len(tokens) < 200
    assert engine.generate("the cat", adapter="g1", max_new_tokens=3)["tokens"] <= 3  # still serving


def test_continuous_and_static_give_the_same_tokens(engines):
    prompts = [("the cat sat on", "g0"), ("hello world", None), ("we like green tea", "g1"), ("red", "g0")]
    answers = {}
    for scheduling, engine in engines.items():
        futures = [engine.submit_generate(p, adapter=a, max_new_tokens=n, temperature=t, seed=7)
                   for (p, a), n, t in zip(prompts, [9, 3, 12, 6], [0.0, 0.0, 1.2, 0.8], strict=True)]
        answers[scheduling] = [f.result(timeout=120)["token_ids"] for f in futures]
    assert answers["continuous"] == answers["static"]
