"""TLS contexts for NBD servers and clients (NBD_OPT_STARTTLS)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server context; with ``ca``, clients must present a certificate signed by it."""
    for path in (cert, key, *(() if ca is None else (ca,))):
        if not Path(path).is_file():
            raise FileNotFoundError(f"TLS file not found: {path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context verifying the server against ``ca`` (or the system store)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx
