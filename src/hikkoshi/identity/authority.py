"""The cluster's certificate authority: made once (``hikkoshi cluster init DIR``), kept by the user, and
used to issue one certificate per host (``hikkoshi cluster issue HOST``).

Keys are ECDSA P-256 (fast to make, accepted by OpenSSL and by QEMU's GnuTLS). A host certificate names
the host as its common name and as a DNS name, lists the host's addresses, and is good for both ends
of a TLS connection (server and client), so one set of files serves the agent's API, its calls to other
agents, QEMU's migration stream and NBD. Key files are written mode 0600 in directories of mode 0700.
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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hikkoshi.identity.names import ORGANIZATION, check_host_name, is_ip

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
HOST_CERT = "host-cert.pem"
HOST_KEY = "host-key.pem"


class AuthorityError(ValueError):
    """The CA or a certificate cannot be made or read (the message says why)."""


@dataclass(frozen=True)
class Issued:
    """Where a host's files were written."""

    cert: Path
    key: Path
    ca: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with ``mode`` from the start (never readable by others, even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    # QEMU refuses a leaf whose critical key usage lacks key encipherment, whatever its key type.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(directory: Path, name: str = "hikkoshi cluster CA", days: int = 3650) -> Path:
    """A new CA in ``directory`` (``ca-cert.pem``, ``ca-key.pem``); its certificate's path. Refuses a
    directory that has a CA already (issued certificates would stop being trusted)."""
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        raise AuthorityError(f"{directory} holds a CA already; the certificates it issued trust only it")
    if days < 1:
        raise AuthorityError("a CA must be valid for at least one day")
    _private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _key_pem(key), 0o600)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / CA_CERT


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in ``directory``: its certificate and key."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise AuthorityError(f"{directory} holds no CA ({exc.filename} is missing): make one with "
                             "`hikkoshi cluster init DIR`") from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise AuthorityError(f"the CA in {directory} cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthorityError(f"the CA key in {directory} is not an EC key")
    return cert, key


def issue_host(
    ca_dir: Path, host: str, out: Path, addresses: list[str] | None = None, days: int = 825
) -> Issued:
    """A certificate for ``host`` signed by the CA in ``ca_dir``, written to ``out`` with its key and a
    copy of the CA's certificate (``host-cert.pem``, ``host-key.pem``, ``ca-cert.pem``)."""
    check_host_name(host)
    ips = []
    for address in addresses or []:
        if not is_ip(address):
            raise AuthorityError(f"--address {address!r} is not an IP address")
        ips.append(ipaddress.ip_address(address.strip("[]")))
    if days < 1:
        raise AuthorityError("a certificate must be valid for at least one day")
    for name in (HOST_CERT, HOST_KEY):
        if (out / name).exists():
            raise AuthorityError(f"{out / name} exists already; remove it to issue a new one")
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    if now + datetime.timedelta(days=days) > ca_cert.not_valid_after_utc:
        days = max(1, (ca_cert.not_valid_after_utc - now).days)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, host),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host), *(x509.IPAddress(ip) for ip in ips)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_copy = out / CA_CERT
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if ca_copy.exists() and ca_copy.read_bytes() != ca_pem:
        raise AuthorityError(f"{ca_copy} is another CA's certificate")
    _private_dir(out)
    if not ca_copy.exists():
        _write(ca_copy, ca_pem, 0o644)
    _write(out / HOST_KEY, _key_pem(key), 0o600)
    _write(out / HOST_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(out / HOST_CERT, out / HOST_KEY, ca_copy)
