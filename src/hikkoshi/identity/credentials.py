"""A host's credentials as an agent (and every daemon it starts) uses them: its certificate, its key,
and the cluster CA's certificate, checked once when loaded, then turned into TLS contexts and into the
directory layout QEMU reads.

Checks at load: the files exist, the key is readable by its owner only, the certificate was issued by
that CA, is valid now, belongs to the key, and names a host (see :func:`~hikkoshi.identity.names.peer_name`).
"""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from hikkoshi.identity.names import check_host_name
from hikkoshi.identity.tls_dir import TlsDir, client_context, server_context


class CredentialsError(ValueError):
    """The host's certificate, key or CA cannot be used (the message says why and what to do)."""


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret (a key, a token) that others than its owner may read or write."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CredentialsError(f"{what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise CredentialsError(
            f"{what} {path} is open to others (mode {stat.S_IMODE(mode):04o}): "
            f"make it readable by its owner only (chmod 600 {path})"
        )


@dataclass(frozen=True)
class HostCredentials:
    """A host's certificate, key and cluster CA (see the module's docstring); ``name`` is the host's."""

    cert: Path
    key: Path
    ca: Path
    name: str

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path) -> HostCredentials:
        """Load and check the three files."""
        cert, key, ca = cert.absolute(), key.absolute(), ca.absolute()
        check_private_file(key, "the host key")
        try:
            leaf = x509.load_pem_x509_certificate(cert.read_bytes())
            authority = x509.load_pem_x509_certificate(ca.read_bytes())
            private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except OSError as exc:
            raise CredentialsError(f"{exc.filename}: {exc.strerror}") from None
        except ValueError as exc:
            raise CredentialsError(f"not a PEM certificate or key: {exc}") from None
        try:
            leaf.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialsError(f"{cert} was not issued by the CA in {ca}") from None
        now = datetime.datetime.now(datetime.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise CredentialsError(
                f"{cert} is valid from {leaf.not_valid_before_utc:%Y-%m-%d} "
                f"to {leaf.not_valid_after_utc:%Y-%m-%d}, not now"
            )
        if private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CredentialsError(f"{key} is not the key of {cert}")
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        try:
            check_host_name(name)
            dns = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            raise CredentialsError(
                f"{cert} names no host (issue host certificates with `hikkoshi cluster issue`)"
            ) from None
        if name not in dns.get_values_for_type(x509.DNSName):
            raise CredentialsError(f"{cert}: its common name {name!r} is not among its DNS names")
        return cls(cert, key, ca, name)

    # --- QEMU ----------------------------------------------------------------------------------------------

    def server_context(self, *, client_certificate: str = "required") -> ssl.SSLContext:
        """A server context with this host's certificate (see :func:`.tls_dir.server_context`)."""
        return server_context(self.cert, self.key, self.ca, client_certificate=client_certificate)

    def client_context(self) -> ssl.SSLContext:
        """A client context with this host's certificate (see :func:`.tls_dir.client_context`)."""
        return client_context(self.cert, self.key, self.ca)

    def qemu_dir(self, directory: Path) -> TlsDir:
        """Write QEMU's ``tls-creds-x509`` layout of these files into ``directory`` (mode 0700, keys 0600):
        the host certificate as both the server's and the client's. Rewritten on every call (the files may
        have been renewed)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        sources = {
            "ca-cert.pem": self.ca,
            "server-cert.pem": self.cert,
            "client-cert.pem": self.cert,
            "server-key.pem": self.key,
            "client-key.pem": self.key,
        }
        for name, source in sources.items():
            tmp = directory / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, directory / name)
        return TlsDir(directory)
