"""What a deployment is built from, without starting one: the certificates and SuperNode keys, the
pre-trained sources kept on disk for the ClientApp processes, the grid's own wait for replies."""

from __future__ import annotations

import ssl
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key  # noqa: E402
from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from adapterkit.cli import app as cli  # noqa: E402
from adapterkit.federated import FederatedError, LocalGrid, builtin  # noqa: E402
from adapterkit.federated.grid import BoundedGrid  # noqa: E402
from adapterkit.federated.keys import make_keys  # noqa: E402
from adapterkit.federated.simulate import _in_process_identity  # noqa: E402


def test_keys_make_a_ca_a_server_certificate_for_the_hosts_and_node_key_pairs(tmp_path):
    keys = make_keys(tmp_path / "keys", nodes=2, hosts=("127.0.0.1", "link.example"))
    ca = x509.load_pem_x509_certificate(keys.ca.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]
    # what Python's TLS stack (and so the SuperLink's) makes of the pair: it loads, and the CA verifies it
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(keys.server_cert, keys.server_key)
    # strict RFC 5280 path validation (as Python 3.13's default context asks): key identifiers, usages
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.IPAddress(__import__("ipaddress")
                                                                                      .ip_address("127.0.0.1")))
    verifier.verify(server, [])
    for node in range(2):
        private = load_ssh_private_key(keys.node_key(node).read_bytes(), None)
        public = load_ssh_public_key(keys.node_public_key(node).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert keys.node_key(node).stat().st_mode & 0o077 == 0  # the owner's alone
    with pytest.raises(FederatedError, match="holds keys for nodes 0..1"):
        keys.node_key(2)
    with pytest.raises(FederatedError, match="already holds ca.crt"):  # nothing is overwritten
        make_keys(tmp_path / "keys", nodes=1)


def test_the_keys_command_writes_them(tmp_path):
    result = CliRunner().invoke(cli, ["federated", "keys", str(tmp_path / "k"), "--nodes", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "ca.crt", "ca.key", "node-0", "node-0.pub", "node-1", "node-1.pub", "node-2", "node-2.pub",
        "server.key", "server.pem"]
    again = CliRunner().invoke(cli, ["federated", "keys", str(tmp_path / "k")])
    assert again.exit_code != 0 and "give a new folder" in again.output


def test_a_pre_trained_source_is_trained_once_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    calls = []

    def train() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}

    first = builtin.pretrained_source("toy-seed0", train)
    again = builtin.pretrained_source("toy-seed0", train)
    assert len(calls) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    (cached,) = (tmp_path / "federated").iterdir()
    cached.write_bytes(b"torn")  # a broken file is trained again and replaced
    builtin.pretrained_source("toy-seed0", train)
    assert len(calls) == 2
    monkeypatch.setenv("ADAPTERKIT_CACHE", "off")
    builtin.pretrained_source("toy-seed0", train)
    assert len(calls) == 3


def test_digits_are_read_from_scikit_learns_file_as_load_digits_returns_them():
    from sklearn.datasets import load_digits

    x, y = builtin.digits_arrays()
    expected_x, expected_y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(y, expected_y)


def test_the_grid_waits_for_replies_itself_and_returns_what_came_before_the_timeout():
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        if context.node_config["partition-id"] == 1:
            time.sleep(1.0)  # past the timeout below
        return Message(RecordDict({"config": ConfigRecord({"node": context.node_config["partition-id"]})}),
                       reply_to=msg)

    _in_process_identity()
    inner = LocalGrid(app, 2)
    grid = BoundedGrid(inner, need=2, wait=5.0)
    messages = [grid.create_message(RecordDict({"config": ConfigRecord({})}), MessageType.TRAIN, node, "1")
                for node in grid.get_node_ids()]
    started = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=0.4))
    assert time.monotonic() - started < 0.9
    assert [r.content["config"]["node"] for r in replies] == [0]
    inner.close()


def _train_on(settings_task: str, node_config: dict, **task_args) -> Message:  # noqa: ANN003
    """One train message to a ClientApp whose node config is `node_config`; its reply."""
    from adapterkit.federated import Settings, client_app, make_participant

    _in_process_identity()
    settings = Settings(task=settings_task, clients=2, per_client=40, test_size=40, **task_args)
    factory = settings.factory()
    grid = LocalGrid(client_app(factory, settings.key()), 1)
    (node,) = grid.get_node_ids()
    grid.contexts[node].node_config = node_config
    arrays = make_participant(factory(), "adapter").arrays()
    msg = grid.create_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"local-epochs": 1})}),
                              MessageType.TRAIN, node, "1")
    (reply,) = grid.send_and_receive([msg], timeout=300)
    grid.close()
    return reply


def test_a_node_trains_on_its_own_arrays_from_data_path(tmp_path):
    x, y = builtin.digits_arrays()
    np.save(tmp_path / "x.npy", (x[:30] / 16.0).astype(np.float32))
    np.save(tmp_path / "y.npy", y[:30])
    reply = _train_on("digits", {"data-path": str(tmp_path), "partition-id": 7})
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == 30 and reply.content["meta"]["partition-id"] == 7
    np.savez(tmp_path / "names.npz", x=(x[:5] / 16.0).astype(np.float32), y=np.array(["3", "1", "4", "1", "5"]))
    reply = _train_on("digits", {"data-path": str(tmp_path / "names.npz")})
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == 5


@pytest.mark.parametrize(("x", "y", "problem"), [
    (np.zeros((4, 64), np.float32), np.array([0, 1, 12, 2]), "row 2 has label 12"),
    (np.zeros((4, 63), np.float32), np.array([0, 1, 2, 3]), "shaped \\(N, 64\\)"),
    (np.full((2, 64), np.nan, np.float32), np.array([0, 1]), "finite numbers"),
])
def test_data_path_that_does_not_fit_the_task_is_refused_with_the_reason(tmp_path, x, y, problem):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    reply = _train_on("digits", {"data-path": str(tmp_path / "bad.npz")})
    assert reply.has_error()
    assert __import__("re").search(problem, reply.error.reason), reply.error.reason
    reply = _train_on("digits", {"data-path": str(tmp_path / "missing.npz")})
    assert reply.has_error() and "does not exist on this node" in reply.error.reason


@pytest.mark.slow
def test_a_node_trains_on_its_own_csv_of_texts(tmp_path):
    from adapterkit.federated.builtin import _corpus

    texts, raw = _corpus("tweets")
    labels = sorted(set(raw))
    rows = ["text,sentiment", *(f'"{t.replace(chr(34), "")}",{v}' for t, v in list(zip(texts, raw, strict=True))[:24])]
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    reply = _train_on("tweets", {"data-path": str(tmp_path / "site.csv")})
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == 24
    (tmp_path / "other.csv").write_text("text,sentiment\nhello there,delighted\n")
    reply = _train_on("tweets", {"data-path": str(tmp_path / "other.csv")})
    assert reply.has_error() and f"not one of the task's labels ({', '.join(labels)})" in reply.error.reason
