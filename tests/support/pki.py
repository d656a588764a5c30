"""A throwaway X.509 PKI for tests: a CA, server and client certificates, in the layouts QEMU and libnbd
read (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_key(key: rsa.RSAPrivateKey) -> bytes:
    """A private key as unencrypted PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    """A certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hikkoshi tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed CA valid for a month: its certificate and key."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey], cn: str, server: bool
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A certificate signed by ``ca`` for a server (127.0.0.1 and localhost) or a client, and its key."""
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@dataclass
class Pki:
    """The files of :func:`pki`."""

    ca: Path  # ca-cert.pem
    server_cert: Path
    server_key: Path
    client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem (qemu and libnbd layout)
    anonymous_dir: Path  # ca-cert.pem only: a client without a certificate
    rogue_dir: Path  # ca-cert.pem plus a client certificate signed by another CA

    @property
    def client_cert(self) -> Path:
        return self.client_dir / "client-cert.pem"

    @property
    def client_key(self) -> Path:
        return self.client_dir / "client-key.pem"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if path.name.endswith("key.pem"):
        path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server and a client certificate by it, and a rogue client certificate by another CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca("hikkoshi test CA")
    server = make_leaf(ca, "127.0.0.1", server=True)
    client = make_leaf(ca, "client", server=False)
    rogue = make_leaf(make_ca("some other CA"), "rogue", server=False)
    ca_pem = pem_cert(ca[0])
    for sub in ("client", "anonymous", "rogue"):
        _write(root / sub / "ca-cert.pem", ca_pem)
    _write(root / "client" / "client-cert.pem", pem_cert(client[0]))
    _write(root / "client" / "client-key.pem", pem_key(client[1]))
    _write(root / "rogue" / "client-cert.pem", pem_cert(rogue[0]))
    _write(root / "rogue" / "client-key.pem", pem_key(rogue[1]))
    return Pki(
        ca=_write(root / "server" / "ca-cert.pem", ca_pem),
        server_cert=_write(root / "server" / "server-cert.pem", pem_cert(server[0])),
        server_key=_write(root / "server" / "server-key.pem", pem_key(server[1])),
        client_dir=root / "client",
        anonymous_dir=root / "anonymous",
        rogue_dir=root / "rogue",
    )
