"""How to reach etcd: endpoints, TLS client certificates, timeouts. Pure data.

TLS: start etcd with ``--cert-file``, ``--key-file`` (its server certificate, whose SAN must name the
address or ``tls_server_name``), ``--client-cert-auth`` and ``--trusted-ca-file`` (the CA that signed the
agents' client certificates), and its client URLs as ``https://``; give every agent
``EtcdTls(ca_file=..., cert_file=..., key_file=...)``. With several endpoints the certificate is checked
against one name for all of them (gRPC cannot take a name per address), so give ``server_name``
when the addresses are not all in the certificate under that one name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EtcdTls:
    """A CA to check etcd's certificate against and this client's certificate and key (PEM files)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    """The name etcd's certificate is checked against, when not the endpoint's host."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how long to wait for it.

    ``attempt_timeout`` bounds one request to one member; ``deadline`` bounds a whole operation with
    its retries (another member, a new leader, a reconnect). Past it: :class:`EtcdUnavailable`.
    """

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    tls: EtcdTls | None = None
    attempt_timeout: float = 2.0
    deadline: float = 10.0
    retry_backoff: tuple[float, float] = field(default=(0.05, 1.0))
    """First and largest pause between two attempts (it doubles)."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd needs at least one endpoint")
        for e in self.endpoints:
            if "://" in e or ":" not in e:
                raise ValueError(f"an etcd endpoint is HOST:PORT, not {e!r}")
        if self.attempt_timeout <= 0 or self.deadline < self.attempt_timeout:
            raise ValueError("need 0 < attempt_timeout <= deadline")

    @classmethod
    def of(
        cls,
        endpoints: Sequence[str] | str,
        *,
        tls: EtcdTls | None = None,
        attempt_timeout: float = 2.0,
        deadline: float = 10.0,
    ) -> EtcdConfig:
        """From ``"h1:p1,h2:p2"`` or a list; ``http(s)://`` prefixes are dropped."""
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        cleaned = tuple(e.strip().split("://", 1)[-1].rstrip("/") for e in items if e.strip())
        return cls(endpoints=cleaned, tls=tls, attempt_timeout=attempt_timeout, deadline=deadline)
