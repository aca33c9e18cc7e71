"""Certificates and SuperNode keys for a deployment that lets only registered nodes in.

    adapterkit federated keys certs/ --nodes 3

writes
    ca.crt, ca.key              a certificate authority (the SuperNodes and `flwr` trust ca.crt)
    server.pem, server.key      the SuperLink's TLS certificate, signed by the CA, for `--hosts`
    node-<i>, node-<i>.pub      each SuperNode's EC P-384 key pair in OpenSSH form: the SuperNode
                                signs with node-<i>; `flwr supernode register node-<i>.pub` lets it in

For a real fleet the certificate comes from the organisation's CA; these are for trying it out and for
tests. The private keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .tasks import FederatedError

DAYS = 365


@dataclass(frozen=True)
class Keys:
    """Where `make_keys` wrote each file."""

    folder: Path
    nodes: int

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, index: int) -> Path:
        """SuperNode `index`'s private key (`flower-supernode --auth-supernode-private-key`)."""
        if not 0 <= index < self.nodes:
            raise FederatedError(f"node key {index}: {self.folder} holds keys for nodes 0..{self.nodes - 1}")
        return self.folder / f"node-{index}"

    def node_public_key(self, index: int) -> Path:
        """SuperNode `index`'s public key (`flwr supernode register`)."""
        return self.node_key(index).with_suffix(".pub")


def make_keys(folder: str | Path, nodes: int, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Keys:
    """A CA, a SuperLink certificate for `hosts` (IP addresses or DNS names) and `nodes` SuperNode key
    pairs, written into `folder` (new, or without any of these files)."""
    if nodes < 0:
        raise FederatedError(f"nodes={nodes} must be 0 or more")
    if not hosts:
        raise FederatedError("the SuperLink's certificate needs at least one host name or address")
    keys = Keys(Path(folder), nodes)
    planned = [keys.ca, keys.folder / "ca.key", keys.server_cert, keys.server_key,
               *(p for i in range(nodes) for p in (keys.node_key(i), keys.node_public_key(i)))]
    existing = [p.name for p in planned if p.exists()]
    if existing:
        raise FederatedError(f"{keys.folder} already holds {', '.join(existing)}; give a new folder")
    keys.folder.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adapterkit federation CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name,
                            server_key.public_key())
                   .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   # identifiers that strict verification (Python 3.13's default, openssl -x509_strict) asks for
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    keys.ca.write_bytes(ca_cert.public_bytes(pem))
    keys.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(keys.folder / "ca.key", _pkcs8(ca_key))
    _write_private(keys.server_key, _pkcs8(server_key))
    for i in range(nodes):
        node = ec.generate_private_key(ec.SECP384R1())
        _write_private(keys.node_key(i), node.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                            serialization.NoEncryption()))
        keys.node_public_key(i).write_bytes(node.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DAYS)))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
