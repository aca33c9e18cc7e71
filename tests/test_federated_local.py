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

    inner = LocalGrid(app, 2)
    grid = BoundedGrid(inner, need=2, wait=5.0)
    messages = [grid.create_message(RecordDict({"config": ConfigRecord({})}), MessageType.TRAIN, node, "1")
                for node in grid.get_node_ids()]
    started = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=0.4))
    assert time.monotonic() - started < 0.9
    assert [r.content["config"]["node"] for r in replies] == [0]
    inner.close()
