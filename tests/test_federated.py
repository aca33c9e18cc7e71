"""Federated adapters on Flower: what travels, how it is aggregated, bad replies, faults, checkpoints, DP.

The fast tests drive the real strategies through `LocalGrid` (in this process); one test runs
Flower's Ray simulation engine. The task is the built-in `digits`: scikit-learn's handwritten digits,
an MLP pre-trained on digits 0-4, LoRA on its hidden layers learning all ten.
"""

from __future__ import annotations

import math

import pytest

flwr = pytest.importorskip("flwr")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord  # noqa: E402

from adapterkit.federated import (  # noqa: E402
    ADAPTER,
    FederatedError,
    Settings,
    build_task,
    check_arrays,
    dirichlet_split,
    fedavg,
    make_participant,
    parse_faults,
    simulate,
    svd_refactor,
)
from adapterkit.federated.client import _LOCAL, forget_local  # noqa: E402


def digits(**kw) -> Settings:
    base = {"task": "digits", "clients": 4, "rounds": 3, "per_client": 120, "timeout": 60.0}
    return Settings(**{**base, **kw})


@pytest.fixture(autouse=True)
def _fresh_tasks():
    forget_local()
    yield
    forget_local()


# --- aggregation ---------------------------------------------------------------------------------

def _lora_reply(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"sites.l.lora_A": a, "sites.l.lora_B": b, "head.weight": b.sum(1, keepdim=True)}


def test_fedavg_weights_by_examples():
    x = [{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}]
    assert torch.allclose(fedavg(x, [3, 1])["w"], torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="positive total"):
        fedavg(x, [0, 0])


def test_svd_refactor_is_exact_where_fedavg_of_factors_is_not():
    gen = torch.Generator().manual_seed(0)
    r, n_in, n_out = 2, 12, 10
    # two clients whose updates share one rank-2 column space: the mean product has rank 2
    u = torch.randn(n_out, r, generator=gen)
    replies = [_lora_reply(torch.randn(r, n_in, generator=gen), u @ torch.randn(r, r, generator=gen))
               for _ in range(2)]
    out, refactor_error, fedavg_error = svd_refactor(replies, [1.0, 3.0])
    target = sum(w / 4 * (t["sites.l.lora_B"] @ t["sites.l.lora_A"]) for t, w in zip(replies, [1.0, 3.0], strict=True))
    assert torch.allclose(out["sites.l.lora_B"] @ out["sites.l.lora_A"], target, atol=1e-5)
    assert refactor_error < 1e-6 < 0.05 < fedavg_error
    assert out["sites.l.lora_A"].shape == (r, n_in) and out["sites.l.lora_B"].shape == (n_out, r)
    assert torch.allclose(out["head.weight"], fedavg(replies, [1.0, 3.0])["head.weight"])  # others: FedAvg


def test_svd_refactor_keeps_conv_lora_shapes():
    gen = torch.Generator().manual_seed(1)
    replies = [{"sites.c.lora_A": torch.randn(2, 3, 5, generator=gen), "sites.c.lora_B": torch.randn(4, 2, 1, generator=gen)}
               for _ in range(3)]
    out, _, _ = svd_refactor(replies, [1, 1, 1])
    assert out["sites.c.lora_A"].shape == (2, 3, 5) and out["sites.c.lora_B"].shape == (4, 2, 1)


def test_ffa_freezes_lora_a_so_averaging_b_is_the_average_product():
    task = build_task("digits", clients=2, per_client=60)
    part = make_participant(task, "ffa")
    assert part.params and not any(k.endswith("lora_A") for k in part.params)
    assert any(k.endswith("lora_B") for k in part.params)
    full = make_participant(task, "adapter")
    assert set(part.params) < set(full.params)
    assert part.fingerprint != full.fingerprint  # the frozen A is part of what both sides must share


# --- partitions ------------------------------------------------------------------------------------

def test_dirichlet_split_uses_every_row_once_and_skews_with_small_alpha():
    labels = torch.arange(10).repeat(100)
    skewed = dirichlet_split(labels, 10, 0.1, seed=0)
    even = dirichlet_split(labels, 10, 100.0, seed=0)
    assert sorted(torch.cat(skewed).tolist()) == list(range(1000))

    def spread(parts):  # mean share of a client's commonest class
        return float(np.mean([torch.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert spread(skewed) > 0.4 > 0.2 > spread(even)
    with pytest.raises(FederatedError, match="alpha > 0"):
        dirichlet_split(labels, 10, 0.0)


# --- the in-process run ------------------------------------------------------------------------------

def test_in_process_run_learns_and_only_adapter_tensors_travel():
    outcome = simulate(digits(rounds=4), backend="inprocess")
    accuracies = [outcome.rounds[str(r)]["test_accuracy"] for r in range(5)]
    assert accuracies[-1] > accuracies[0] + 0.15, accuracies  # ten digits from a model that knew five
    task = build_task("digits", clients=4, per_client=120)
    part = make_participant(task, "adapter")
    base_bytes = sum(p.numel() * 4 for p in part.model.base.parameters())
    assert outcome.bytes_per_client_round == part.arrays().count_bytes() < base_bytes / 2
    assert outcome.bytes_per_client_round < part.count_bytes() + 200 * len(part.params)  # + names, shapes
    assert all(k.startswith(("sites.", "head.")) for k in outcome.arrays.keys())
    assert all(outcome.rounds[str(r)]["kept"] == 4 for r in range(1, 5))


def test_full_model_fedavg_sends_every_weight():
    outcome = simulate(digits(rounds=1, full_model=True), backend="inprocess")
    model = build_task("digits", clients=4, per_client=120).make_base()
    raw = sum(p.numel() * 4 for p in model.parameters())
    assert raw <= outcome.bytes_per_client_round < raw * 1.05  # count_bytes adds names, dtypes, shapes


def test_server_drops_bad_replies_and_says_which_and_why():
    outcome = simulate(digits(rounds=2, clients=6, faults="drop:0@2,nan:1,shape:2@1,foreign:3"), backend="inprocess")
    reasons = {(d["round"], d["partition_id"]): d["reason"] for d in outcome.dropped}
    assert "non-finite" in reasons[(1, 1)] and "non-finite" in reasons[(2, 1)]
    assert "shape" in reasons[(1, 2)] and (2, 2) not in reasons
    assert "fingerprint" in reasons[(1, 3)]
    # an error reply carries no partition; the server names it from the node's good reply of round 1
    assert "dropped out" in reasons[(2, 0)]
    assert outcome.rounds["1"]["kept"] == 3 and outcome.rounds["2"]["kept"] == 3
    assert all(outcome.rounds[r]["aggregated"] for r in ("1", "2"))
    assert all(np.isfinite(a.numpy()).all() for a in outcome.arrays.values())


def test_late_client_is_left_out_of_its_round():
    outcome = simulate(digits(rounds=1, clients=3, faults="late:2", late_seconds=4.0, timeout=2.0),
                       backend="inprocess")
    assert outcome.rounds["1"]["sent"] == 3 and outcome.rounds["1"]["replied"] == 2
    assert outcome.rounds["1"]["aggregated"]


def test_round_with_too_few_good_replies_keeps_the_adapter():
    start = make_participant(build_task("digits", clients=3, per_client=120), "adapter").arrays()
    outcome = simulate(digits(rounds=1, clients=3, min_available=2, faults="nan:0,nan:1"), backend="inprocess")
    assert outcome.rounds["1"]["kept"] == 1 and not outcome.rounds["1"]["aggregated"]
    for key in start.keys():
        assert np.array_equal(start[key].numpy(), outcome.arrays[key].numpy())


def test_checkpoint_each_round_and_resume_from_the_last(tmp_path):
    first = simulate(digits(rounds=2, checkpoint_dir=str(tmp_path)), backend="inprocess")
    assert sorted(p.name for p in tmp_path.glob("round-*.safetensors")) == ["round-0001.safetensors",
                                                                           "round-0002.safetensors"]
    forget_local()
    resumed = simulate(digits(rounds=3, checkpoint_dir=str(tmp_path)), backend="inprocess")
    assert resumed.resumed_from == 2
    assert set(resumed.rounds) >= {"1", "2", "3"}  # the history carries over
    assert resumed.rounds["2"]["test_accuracy"] == first.rounds["2"]["test_accuracy"]
    # the checkpoint is an adapter file: it loads onto a fresh copy of the base
    task = build_task("digits", clients=4, per_client=120)
    part = make_participant(task, "adapter")
    part.model.delete(ADAPTER)
    name = part.model.load(str(tmp_path / "round-0003.safetensors"))
    loaded = part.model.adapter_state_dict(name)
    for key in resumed.arrays.keys():
        assert np.allclose(loaded[key].numpy(), resumed.arrays[key].numpy())
    # a checkpoint made for another model is refused, not resumed
    forget_local()
    with pytest.raises(ValueError, match="fingerprint"):
        simulate(digits(rounds=4, checkpoint_dir=str(tmp_path), aggregation="ffa"), backend="inprocess")


def test_client_side_clipping_bounds_each_update():
    start = make_participant(build_task("digits", clients=3, per_client=120), "adapter").tensors()
    clip = 0.05
    outcome = simulate(digits(rounds=1, clients=3, dp=f"client:noise=0,clip={clip}"), backend="inprocess")
    assert outcome.dp == {"clipping": "client", "noise_multiplier": 0.0, "clipping_norm": clip, "noise_stdev": 0.0}
    change = math.sqrt(sum(float((torch.from_numpy(outcome.arrays[k].numpy()) - v).pow(2).sum())
                           for k, v in start.items()))
    assert 0 < change <= clip * 1.001  # the mean of updates each at most `clip` long


def test_server_side_dp_reports_its_noise():
    outcome = simulate(digits(rounds=1, clients=3, dp="server:noise=0.5,clip=1.0"), backend="inprocess")
    assert outcome.dp["noise_stdev"] == pytest.approx(0.5 * 1.0 / 3)
    assert outcome.rounds["1"]["aggregated"]


def test_fedprox_keeps_local_updates_closer_to_the_global_adapter():
    def change(mu: float) -> float:
        forget_local()
        start = make_participant(build_task("digits", clients=2, per_client=120), "adapter").tensors()
        out = simulate(digits(rounds=1, clients=2, proximal_mu=mu), backend="inprocess").arrays
        return sum(float((torch.from_numpy(out[k].numpy()) - v).pow(2).sum()) for k, v in start.items())

    assert change(50.0) < 0.7 * change(0.0)


def test_server_step_scales_the_averaged_update_and_momentum_carries_it():
    def updates(**kw) -> list[dict[str, torch.Tensor]]:
        forget_local()
        start = make_participant(build_task("digits", clients=2, per_client=120), "adapter").tensors()
        out = []
        for rounds in (1, 2):
            forget_local()
            arrays = simulate(digits(rounds=rounds, clients=2, **kw), backend="inprocess").arrays
            out.append({k: torch.from_numpy(arrays[k].numpy()) for k in start})
        return [{k: out[0][k] - start[k] for k in start}, {k: out[1][k] - out[0][k] for k in start}]

    plain, doubled = updates(), updates(server_lr=2.0)
    for k in plain[0]:  # round 1 starts from the same adapter, so the clients send the same updates
        torch.testing.assert_close(doubled[0][k], 2 * plain[0][k])
    momentum = updates(server_momentum=0.5)
    for k in plain[0]:
        torch.testing.assert_close(momentum[0][k], plain[0][k])  # no velocity yet in round 1
    # round 2: the clients' new update Δ₂ (trained from the same adapter as plain FedAvg's round 2)
    # plus half of round 1's
    for k in plain[1]:
        torch.testing.assert_close(momentum[1][k], plain[1][k] + 0.5 * plain[0][k], atol=1e-6, rtol=1e-5)
    with pytest.raises(FederatedError, match="server_lr"):
        Settings(server_momentum=1.0).validate()
    with pytest.raises(FederatedError, match="'svd' re-factors"):
        Settings(aggregation="svd", server_lr=2.0).validate()


def test_bad_settings_say_what_to_write():
    with pytest.raises(FederatedError, match="aggregation"):
        simulate(digits(aggregation="median"), backend="inprocess")
    with pytest.raises(FederatedError, match="for LoRA"):
        Settings(method="bottleneck", aggregation="svd").validate()
    with pytest.raises(ValueError, match="server:noise"):
        Settings(dp="gaussian").validate()
    with pytest.raises(ValueError, match="kind:partition"):
        parse_faults("drop-3")
    with pytest.raises(FederatedError, match="natural"):
        build_task("tweets", partition="natural")
    with pytest.raises(FederatedError, match="splits by user"):
        build_task("har", partition="dirichlet:0.3")


def test_check_arrays_names_the_problem():
    task = build_task("digits", clients=2, per_client=60)
    part = make_participant(task, "adapter")
    template = part.template()
    good = part.arrays()
    assert check_arrays(good, template) is None
    key = next(iter(good.keys()))
    missing = ArrayRecord({k: v for k, v in good.items() if k != key})
    assert "missing" in check_arrays(missing, template)
    ints = ArrayRecord({**dict(good.items()), key: Array(np.zeros(good[key].shape, dtype=np.int64))})
    assert "dtype" in check_arrays(ints, template)


def test_frozen_base_never_changes():
    simulate(digits(rounds=1, clients=2), backend="inprocess")
    fresh = build_task("digits", clients=2, per_client=120).make_base().state_dict()
    held = [part for (key, _), (_, part) in _LOCAL.items()]
    assert len(held) == 2  # the server's copy and the clients'
    for part in held:
        assert all(torch.equal(fresh[k], v) for k, v in part.model.base.state_dict().items() if k in fresh)


# --- Flower's Ray simulation engine ----------------------------------------------------------------

@pytest.mark.slow
def test_ray_simulation_engine_runs_the_same_apps():
    outcome = simulate(digits(rounds=2, clients=3, faults="nan:2"), backend="ray")
    assert outcome.backend == "ray"
    assert outcome.rounds["2"]["kept"] == 2 and outcome.rounds["2"]["aggregated"]
    assert outcome.rounds["2"]["test_accuracy"] > outcome.rounds["0"]["test_accuracy"]
    assert any("non-finite" in d["reason"] for d in outcome.dropped)


@pytest.mark.slow
def test_har_clients_are_users_of_the_on_device_recipe():
    task = build_task("har", clients=3, partition="natural", per_client=40, test_size=60)
    assert [c.group for c in task.clients] == ["user 0", "user 1", "user 2"]
    assert all(len(c) == 40 for c in task.clients)
    outcome = simulate(Settings(task="har", clients=3, rounds=3, partition="natural", method="bottleneck",
                                per_client=40, test_size=60, timeout=120.0), backend="inprocess")
    assert outcome.rounds["3"]["aggregated"]
    assert outcome.rounds["3"]["test_accuracy"] >= outcome.rounds["0"]["test_accuracy"]
    pooled = build_task("har", clients=3, partition="iid", per_client=40, test_size=60)
    assert [c.group for c in pooled.clients] == ["shard 0", "shard 1", "shard 2"]
    assert torch.equal(pooled.test.inputs, task.test.inputs)  # the same users, the same test set
    natural = torch.cat([c.inputs for c in task.clients]).flatten(1)
    shards = [c.inputs.flatten(1) for c in pooled.clients]
    assert sorted(map(tuple, torch.cat(shards).tolist())) == sorted(map(tuple, natural.tolist()))
    # each shard now holds examples of more than one user
    owner = {tuple(row): i for i, c in enumerate(task.clients) for row in c.inputs.flatten(1).tolist()}
    assert all(len({owner[tuple(row)] for row in shard.tolist()}) > 1 for shard in shards)


# --- against label skew: a class-means head and balanced local training -----------------------------

def test_class_mean_head_is_the_nearest_mean_classifier_of_the_union():
    from adapterkit.federated.head_init import head_input_sums, head_linear

    outcome = simulate(digits(rounds=1, partition="dirichlet:0.3", head_init="class-means", local_loss="balanced"),
                       backend="inprocess")
    assert outcome.head_init["kept"] == 4 and not outcome.head_init["dropped"]
    # the reference: nearest class mean of the head's inputs, pooled over every client, in plain PyTorch
    task = build_task("digits", clients=4, per_client=120, partition="dirichlet:0.3")
    part = make_participant(task, "adapter")
    pooled = [head_input_sums(task, part, c) for c in task.clients]
    sums, counts = sum(s for s, _ in pooled), sum(n for _, n in pooled)
    means = sums / counts[:, None]
    assert counts.sum() == sum(len(c) for c in task.clients)
    seen: list[torch.Tensor] = []
    handle = head_linear(part).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        task.logits(part.model, task.test.inputs)
    handle.remove()
    nearest = torch.cdist(seen[0].double(), means).argmin(1)
    expected = float((nearest == task.test.labels).double().mean())
    assert outcome.rounds["0"]["test_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert expected > 0.6  # ten digits told apart before any training: the pre-trained features do it


def test_class_sums_replies_are_checked_like_training_replies():
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from adapterkit.federated.head_init import check_sums

    def reply(sums: np.ndarray, counts: np.ndarray, fingerprint: str = "fp") -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({"sums": Array(sums), "counts": Array(counts)}),
                                   "metrics": MetricRecord({"num-examples": 1.0}),
                                   "meta": ConfigRecord({"fingerprint": fingerprint})}),
                       dst_node_id=1, message_type="query")

    good = np.ones((3, 4)), np.ones(3)
    assert check_sums(reply(*good), "fp", (3, 4)) is None
    assert "fingerprint" in check_sums(reply(*good, fingerprint="other"), "fp", (3, 4))
    assert "expected (3, 4)" in check_sums(reply(np.ones((3, 5)), np.ones(3)), "fp", (3, 4))
    assert "non-finite" in check_sums(reply(np.full((3, 4), np.nan), np.ones(3)), "fp", (3, 4))
    assert "dtype" in check_sums(reply(np.ones((3, 4)), np.ones(3, dtype=np.int64)), "fp", (3, 4))
    assert "negative" in check_sums(reply(np.ones((3, 4)), -np.ones(3)), "fp", (3, 4))


def test_a_bad_class_sums_reply_is_dropped_and_too_few_stop_the_run():
    from flwr.app import Error, Message

    from adapterkit.federated.head_init import class_mean_head
    from adapterkit.federated.simulate import LocalGrid, _in_process_identity

    settings = digits(clients=3, head_init="class-means")
    factory = settings.factory()

    def failing(pids: set[int]):
        def mod(msg, context, call_next):  # noqa: ANN001, ANN202 (a Flower client mod)
            if int(context.node_config["partition-id"]) in pids:
                return Message(Error(code=0, reason="no sums here"), reply_to=msg)
            return call_next(msg, context)
        return mod

    _in_process_identity()
    part = make_participant(factory(), "adapter")
    grid = LocalGrid(client_app_with(settings, failing({1})), 3)
    try:
        report = class_mean_head(grid, part, timeout=60.0, min_available=2)
        assert report["kept"] == 2 and "no sums here" in report["dropped"][0]["reason"]
        grid.app = client_app_with(settings, failing({0, 1}))
        with pytest.raises(FederatedError, match="fewer than min_available=2"):
            class_mean_head(grid, part, timeout=60.0, min_available=2)
    finally:
        grid.close()


def client_app_with(settings: Settings, mod):  # noqa: ANN001, ANN201
    from adapterkit.federated.client import client_app

    return client_app(settings.factory(), settings.key(), mods=[mod])


def run_with_mod(settings: Settings, mod):  # noqa: ANN001, ANN201
    """The server's run over an in-process grid whose clients go through `mod` (a Flower client mod)."""
    from adapterkit.federated.simulate import LocalGrid, _in_process_identity, run_server

    _in_process_identity()
    grid = LocalGrid(client_app_with(settings, mod), settings.clients)
    try:
        return run_server(grid, settings)
    finally:
        grid.close()


def test_balanced_loss_shifts_by_the_clients_own_label_frequencies():
    from adapterkit.federated.client import label_shift, local_train

    shift = label_shift(torch.tensor([0, 0, 0, 2]), 4)
    assert torch.allclose(shift[[0, 2]], torch.tensor([0.75, 0.25]).log()) and (shift[[1, 3]] <= -1e4).all()
    task = build_task("digits", clients=2, per_client=120)
    labels = task.clients[0].labels
    one_class = task.clients[0].subset(torch.nonzero(labels == labels.mode().values).flatten())
    assert len(one_class) >= 8

    def moved(loss: str) -> float:
        part = make_participant(task, "adapter")
        before = part.tensors()
        local_train(task, part, one_class, epochs=2, lr=1e-2, loss=loss)
        return max(float((part.params[k].detach() - v).abs().max()) for k, v in before.items())

    # a client that holds one class has nothing to say about telling classes apart: balanced, it
    # barely moves (its only class's probability is already 1); plain cross-entropy pushes that class up
    assert moved("balanced") < 1e-3 < moved("ce")
    with pytest.raises(ValueError, match="local loss"):
        local_train(task, make_participant(task, "adapter"), one_class, epochs=1, lr=1e-2, loss="focal")


def test_head_init_settings_that_cannot_work_say_why():
    with pytest.raises(FederatedError, match="head_init"):
        Settings(head_init="zeros").validate()
    with pytest.raises(FederatedError, match="outside the DP"):
        Settings(head_init="class-means", dp="server:noise=1.0,clip=0.5").validate()
    with pytest.raises(FederatedError, match="full-model"):
        Settings(head_init="class-means", full_model=True).validate()
    with pytest.raises(FederatedError, match="local_loss"):
        Settings(local_loss="focal").validate()


def test_cli_simulate_runs_in_process_and_refuses_a_bad_server_step(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app

    forget_local()
    out = tmp_path / "outcome.json"
    result = CliRunner().invoke(app, ["federated", "simulate", "--task", "digits", "--clients", "2", "--rounds", "1",
                                      "--per-client", "60", "--backend", "inprocess", "--server-lr", "1.5",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and "test accuracy" in result.output
    bad = CliRunner().invoke(app, ["federated", "simulate", "--task", "digits", "--server-momentum", "1",
                                   "--backend", "inprocess"])
    assert bad.exit_code != 0 and "server_momentum" in bad.output


def test_scaffold_sends_each_client_the_mean_step_minus_its_own():
    settings = digits(clients=3, rounds=2, control="scaffold")
    seen: list[dict] = []

    def tensors(record):  # noqa: ANN001, ANN202
        return None if record is None else {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}

    def recorder(msg, context, call_next):  # noqa: ANN001, ANN202 (a Flower client mod)
        sent = tensors(msg.content.array_records.get("arrays"))
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            seen.append({"round": int(msg.content["config"]["server-round"]),
                         "pid": int(context.node_config["partition-id"]), "sent": sent,
                         "correction": tensors(msg.content.array_records.get("correction")),
                         "trained": tensors(reply.content["arrays"]), "control": tensors(reply.content["control"]),
                         "steps": int(reply.content["metrics"]["steps"]),
                         "n": float(reply.content["metrics"]["num-examples"])})
        return reply

    outcome = run_with_mod(settings, recorder)
    first = {s["pid"]: s for s in seen if s["round"] == 1}
    assert sorted(first) == [0, 1, 2] and all(s["correction"] is None for s in first.values())
    for s in first.values():  # uncorrected, c_i is the mean step the client took: (y_i − x) / K
        for key, value in s["control"].items():
            torch.testing.assert_close(value, (s["trained"][key] - s["sent"][key]) / s["steps"])
    total = sum(s["n"] for s in first.values())
    mean = {k: sum(s["control"][k] * (s["n"] / total) for s in first.values()) for k in first[0]["control"]}
    second = {s["pid"]: s for s in seen if s["round"] == 2}
    assert sorted(second) == [0, 1, 2]
    for pid, s in second.items():  # round 2: c − c_i, from round 1's steps
        for key in mean:
            torch.testing.assert_close(s["correction"][key], mean[key] - first[pid]["control"][key],
                                       atol=1e-7, rtol=1e-5)
            # the reported c_i takes the correction back out of what the client moved
            torch.testing.assert_close(s["control"][key], (s["trained"][key] - s["sent"][key]) / s["steps"]
                                       - s["correction"][key], atol=1e-7, rtol=1e-4)
    task = build_task("digits", clients=3, per_client=120)
    part = make_participant(task, "adapter")
    assert outcome.bytes_per_client_round == 2 * part.arrays().count_bytes()  # c_i travels beside y_i
    from adapterkit.federated.client import local_train

    start = part.tensors()  # with lr 0 AdamW stands still, so what moves is the correction, once a step
    _, steps = local_train(task, part, task.clients[0], epochs=1, lr=0.0, correction=second[0]["correction"])
    for key, value in start.items():
        torch.testing.assert_close(part.params[key].detach(), value + steps * second[0]["correction"][key])
    assert outcome.rounds["2"]["kept"] == 3 and outcome.rounds["2"]["test_accuracy"] > outcome.rounds["0"]["test_accuracy"]


def test_the_client_app_steps_with_the_servers_correction():
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from adapterkit.federated.client import client_app
    from adapterkit.federated.simulate import _in_process_identity

    settings = digits(clients=2)
    task = build_task("digits", clients=2, per_client=120)
    part = make_participant(task, "adapter")
    correction = {k: torch.full_like(p, 1e-3) for k, p in part.params.items()}
    app = client_app(settings.factory(), settings.key())
    _in_process_identity()
    content = RecordDict({"arrays": part.arrays(), "config": ConfigRecord({"control": "scaffold", "lr": 0.0,
                                                                           "server-round": 2}),
                          "correction": ArrayRecord({k: Array(v.numpy()) for k, v in correction.items()})})
    context = Context(run_id=0, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(Message(content, 1, "train"), context)
    steps = int(reply.content["metrics"]["steps"])
    for key, sent in part.tensors().items():  # lr 0: the only motion is K corrections
        moved = torch.from_numpy(reply.content["arrays"][key].numpy()) - sent
        torch.testing.assert_close(moved, steps * correction[key])
        torch.testing.assert_close(torch.from_numpy(reply.content["control"][key].numpy()), torch.zeros_like(sent),
                                   atol=1e-8, rtol=0)
    bad = RecordDict({**dict(content.items()), "correction": ArrayRecord({"x": Array(np.zeros(2, np.float32))})})
    with pytest.raises(Exception, match="correction does not fit"):
        app(Message(bad, 1, "train"), context)


def test_scaffold_control_replies_are_checked_and_bad_settings_refused():
    settings = digits(clients=3, rounds=1, control="scaffold")

    def poison(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 1:
            control = reply.content["control"]
            key = next(iter(control.keys()))
            bad = control[key].numpy().copy()
            bad.flat[0] = np.nan
            reply.content["control"] = ArrayRecord({**dict(control.items()), key: Array(bad)})
        return reply

    outcome = run_with_mod(settings, poison)
    assert [(d["partition_id"], "control" in d["reason"] and "non-finite" in d["reason"])
            for d in outcome.dropped] == [(1, True)]
    assert outcome.rounds["1"]["kept"] == 2
    with pytest.raises(FederatedError, match="control"):
        Settings(control="scafold").validate()
    with pytest.raises(FederatedError, match="'svd' re-factors"):
        Settings(control="scaffold", aggregation="svd").validate()
    with pytest.raises(FederatedError, match="outside the DP"):
        Settings(control="scaffold", dp="server:noise=1.0,clip=0.5").validate()
    with pytest.raises(FederatedError, match="before the DP noise"):
        Settings(server_lr=2.0, dp="server:noise=1.0,clip=0.5").validate()
    with pytest.raises(FederatedError, match="server_lr"):
        Settings(server_lr=float("inf")).validate()


# --- no hang, and the facts on disk ----------------------------------------------------------------


def _shrinking_grid(settings: Settings, after_round: int, left: int):  # noqa: ANN202
    """An in-process grid that loses all but `left` nodes once `after_round` rounds were sent."""
    from adapterkit.federated.client import client_app
    from adapterkit.federated.simulate import LocalGrid

    class Shrinking(LocalGrid):
        rounds_sent = 0

        def get_node_ids(self):  # noqa: ANN202
            nodes = list(super().get_node_ids())
            return nodes[:left] if self.rounds_sent >= after_round else nodes

        def push_messages(self, messages):  # noqa: ANN001, ANN202 - the server's grid pushes once a round
            ids = super().push_messages(messages)
            self.rounds_sent += 1
            return ids

    return Shrinking(client_app(settings.factory(), settings.key()), settings.clients)


def test_too_few_nodes_stop_the_run_after_node_wait_and_keep_the_last_adapter(tmp_path):
    import time

    from adapterkit.federated.simulate import _in_process_identity, run_server

    settings = digits(clients=2, rounds=4, min_available=2, node_wait=0.5, checkpoint_dir=str(tmp_path / "ck"),
                      output_dir=str(tmp_path / "out"))
    _in_process_identity()
    grid = _shrinking_grid(settings, after_round=2, left=1)  # round 1 trains and evaluates, then a node goes
    started = time.monotonic()
    try:
        outcome = run_server(grid, settings)
    finally:
        grid.close()
    assert time.monotonic() - started < 60
    assert outcome.stopped is not None and "fewer than the 2 a round needs" in outcome.stopped
    assert outcome.rounds["1"]["aggregated"] and "2" not in outcome.rounds
    assert (tmp_path / "ck" / "state.json").exists()
    written = __import__("json").loads((tmp_path / "out" / "outcome.json").read_text())
    assert written["stopped"] == outcome.stopped and written["rounds"]["1"]["kept"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter.safetensors").exists()
    with pytest.raises(FederatedError, match="node_wait"):
        digits(node_wait=0).validate()


def test_min_available_one_goes_on_with_the_node_it_has(tmp_path):
    from adapterkit.federated.simulate import _in_process_identity, run_server

    settings = digits(clients=2, rounds=3, min_available=1, node_wait=0.5)
    _in_process_identity()
    grid = _shrinking_grid(settings, after_round=2, left=1)
    try:
        outcome = run_server(grid, settings)
    finally:
        grid.close()
    assert outcome.stopped is None
    assert [outcome.rounds[r]["sent"] for r in ("1", "2", "3")] == [2, 1, 1]


def test_a_dropped_reply_names_the_node_it_stands_for_not_the_superlink():
    """A SuperNode's error reply comes from the SuperLink (src_node_id 1); the server names the real node
    and its partition (known from its earlier good replies)."""
    from flwr.app import Error, Message
    from flwr.common.constant import SUPERLINK_NODE_ID

    settings = digits(clients=3, rounds=2, min_available=2)

    def fails_in_round_2(msg, context, call_next):  # noqa: ANN001, ANN202 (a Flower client mod)
        if int(context.node_config["partition-id"]) == 2 and int(msg.content["config"]["server-round"]) == 2:
            reply = Message(Error(code=0, reason="disk full"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as a SuperLink relays it
            return reply
        return call_next(msg, context)

    outcome = run_with_mod(settings, fails_in_round_2)
    (drop,) = [d for d in outcome.dropped if d["round"] == 2]
    assert drop["node_id"] == 1002 and drop["partition_id"] == 2 and "disk full" in drop["reason"]


def test_the_run_config_sets_the_servers_settings_and_guards_the_clients_side():
    from adapterkit.federated import with_run_config

    settings = digits(clients=4)
    got = with_run_config(settings, {"rounds": "5", "min-available": 3, "output-dir": "/tmp/out",
                                     "evaluate-clients": "true", "lr": "0.01", "local-epochs": "none",
                                     "node_wait": 30, "my-own-key": "left alone", "task": "digits", "clients": 4})
    assert (got.rounds, got.min_available, got.output_dir, got.evaluate_clients) == (5, 3, "/tmp/out", True)
    assert got.lr == 0.01 and got.local_epochs is None and got.node_wait == 30.0
    assert settings.rounds == 3  # the app's own Settings are not changed
    with pytest.raises(FederatedError, match="clients is set where the ClientApp is built"):
        with_run_config(settings, {"clients": 8})
    with pytest.raises(FederatedError, match="rounds='many': not a int"):
        with_run_config(settings, {"rounds": "many"})
    with pytest.raises(FederatedError, match="min_available=9 must be between 1 and clients=4"):
        with_run_config(settings, {"min-available": 9})


def test_a_node_whose_num_partitions_differs_from_the_task_is_refused_by_name():
    from adapterkit.federated.client import client_app
    from adapterkit.federated.simulate import LocalGrid, _in_process_identity, run_server

    settings = digits(clients=3, rounds=1, min_available=2)
    _in_process_identity()
    grid = LocalGrid(client_app(settings.factory(), settings.key()), 3)
    grid.contexts[1002].node_config["num-partitions"] = 5  # this SuperNode was started for another split
    try:
        outcome = run_server(grid, settings)
    finally:
        grid.close()
    (drop,) = outcome.dropped
    assert drop["node_id"] == 1002 and "num-partitions=5" in drop["reason"] and "Settings.clients" in drop["reason"]


def test_faults_come_from_the_run_config_and_clipping_follows_the_servers_dp():
    """The public client_app takes faults; a run config's `faults` replace them for a run; an update is
    clipped only when the server's client-side DP sends a clipping norm."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from adapterkit.federated.client import clip_when_asked
    from adapterkit.federated.faults import FaultsMod, parse_faults
    from adapterkit.federated.simulate import _in_process_identity

    _in_process_identity()  # messages take their run from the process's task identity
    mod = FaultsMod(parse_faults("drop:0"))
    train = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    node0 = Context(run_id=0, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="partition 0 dropped out"):
        mod(train, node0, lambda m, c: m)
    calm = Context(run_id=0, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config={"faults": "nan:3"})
    assert mod(train, calm, lambda m, c: m) is train  # the run config's faults replace the app's

    def doubled(msg, context):  # noqa: ANN001, ANN202 (a client that moves its update far)
        arrays = {k: Array(v.numpy() * 0 + 100.0) for k, v in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(arrays)}), reply_to=msg)

    start = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    for norm, bound in ((None, None), (1.0, 1.0)):
        config = ConfigRecord({"server-round": 1, **({KEY_CLIPPING_NORM: norm} if norm else {})})
        msg = Message(RecordDict({"arrays": start, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = "m"
        reply = clip_when_asked(msg, node0, doubled)
        update = reply.content["arrays"]["w"].numpy()
        if bound is None:
            assert np.allclose(update, 100.0)  # no DP: untouched
        else:
            assert np.linalg.norm(update) <= bound + 1e-5


def test_new_app_writes_a_flower_project_that_flower_validates_and_whose_apps_load(tmp_path, monkeypatch):
    import importlib

    import tomllib
    from flwr.clientapp import ClientApp
    from flwr.common.config import validate_config
    from flwr.serverapp import ServerApp
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.federated import with_run_config

    folder = tmp_path / "my-fleet"
    result = CliRunner().invoke(app, ["federated", "new-app", str(folder), "--task", "digits", "--clients", "3",
                                      "--rounds", "4", "--min-available", "2"])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=False)
    assert valid, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["rounds"] == 4 and run_config["min-available"] == 2 and "clients" not in run_config
    assert run_config["output-dir"] == "" and run_config["lr"] == ""  # None, overridable by flwr run --run-config
    monkeypatch.syspath_prepend(str(folder))
    settings_module = importlib.import_module("my_fleet.settings")
    assert settings_module.SETTINGS.task == "digits" and settings_module.SETTINGS.clients == 3
    assert isinstance(importlib.import_module("my_fleet.server_app").app, ServerApp)
    assert isinstance(importlib.import_module("my_fleet.client_app").app, ClientApp)
    valid, errors, _ = validate_config(config, check_module=True, project_dir=folder)
    assert valid, errors
    settings = with_run_config(settings_module.SETTINGS, run_config)  # what the ServerApp runs with
    assert (settings.rounds, settings.min_available, settings.clients) == (4, 2, 3)
    assert settings.output_dir is None and settings.lr is None
    overridden = with_run_config(settings_module.SETTINGS, {**run_config, "output-dir": "/tmp/x", "lr": 0.02})
    assert overridden.output_dir == "/tmp/x" and overridden.lr == 0.02
    again = CliRunner().invoke(app, ["federated", "new-app", str(folder)])
    assert again.exit_code == 2 and "not empty" in again.output
