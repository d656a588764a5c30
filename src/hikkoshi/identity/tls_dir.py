"""A host's TLS files in QEMU's ``tls-creds-x509`` layout (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``, ``client-cert.pem``, ``client-key.pem``): how an agent hands its identity to the
daemons it starts (supervisors, disk services, QEMU), and the TLS contexts they make of it.

Only the standard library: a disk service starts fast. The files were checked when the agent loaded
them (:class:`~hikkoshi.identity.credentials.HostCredentials`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


def server_context(
    cert: Path, key: Path, ca: Path, *, client_certificate: str = "required"
) -> ssl.SSLContext:
    """A TLS server context; clients must present a certificate of ``ca`` (``required``), or may
    (``optional``)."""
    if client_certificate not in ("required", "optional"):
        raise ValueError(f"client_certificate is required or optional, not {client_certificate!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if client_certificate == "required" else ssl.CERT_OPTIONAL
    return ctx


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A TLS client context presenting ``cert`` and trusting ``ca`` only; the server's certificate must
    name the host the caller gives as ``server_hostname``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(frozen=True)
class TlsDir:
    """A directory in QEMU's layout (see the module's docstring)."""

    path: Path

    @property
    def ca(self) -> Path:
        """The cluster CA's certificate."""
        return self.path / "ca-cert.pem"

    @property
    def cert(self) -> Path:
        """The host's certificate."""
        return self.path / "server-cert.pem"

    @property
    def key(self) -> Path:
        """The host's key."""
        return self.path / "server-key.pem"

    def check(self) -> TlsDir:
        """This directory, if it has the files (a clear error otherwise)."""
        missing = [p.name for p in (self.ca, self.cert, self.key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"TLS directory {self.path} lacks {', '.join(missing)}")
        return self

    def server_context(self, *, client_certificate: str = "required") -> ssl.SSLContext:
        """See :func:`server_context`."""
        return server_context(self.cert, self.key, self.ca, client_certificate=client_certificate)

    def client_context(self) -> ssl.SSLContext:
        """See :func:`client_context`."""
        return client_context(self.cert, self.key, self.ca)
