"""Who may use one listener of an NBD server, and how: its TLS context, the host names a client's
certificate must name, and whether its clients may write. Pure.

A disk service listens for its own VM's QEMU on a Unix socket (no TLS, read-write), and for a
migration's peer on the migration address: TLS with a client certificate of the cluster CA naming that
peer, read-only where the peer only reads (a relocation, a cold pull). Each listener carries its own
:class:`Access`; a connection is held to the access of the listener it came through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hikkoshi.identity.names import peer_name
from hikkoshi.nbd.constants import TransmissionFlag
from hikkoshi.nbd.export_info import Catalogue, ExportInfo

if TYPE_CHECKING:
    import ssl

_WRITE_FLAGS = int(
    TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)


@dataclass(frozen=True)
class Access:
    """See the module's docstring."""

    tls: ssl.SSLContext | None = None
    peers: frozenset[str] | None = None
    """Host names one of which a client's certificate must name (``None``: whoever the TLS context
    accepts). Needs ``tls`` that requires client certificates."""
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.peers is not None and self.tls is None:
            raise ValueError("a listener that accepts named peers only needs TLS (their certificates)")

    def admits(self, peercert: Mapping[str, Any] | None) -> bool:
        """Whether a client with this (verified) certificate may go on."""
        if self.peers is None:
            return True
        name = peer_name(peercert)
        return name is not None and name in self.peers

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for status answers."""
        return {
            "tls": self.tls is not None,
            "peers": sorted(self.peers) if self.peers is not None else None,
            "read_only": self.read_only,
        }


def read_only_info(info: ExportInfo) -> ExportInfo:
    """The export as a read-only listener offers it: writes refused (EPERM), none advertised."""
    flags = (info.flags | int(TransmissionFlag.READ_ONLY)) & ~_WRITE_FLAGS
    return dataclasses.replace(info, flags=flags)


class ReadOnlyCatalogue:
    """A catalogue whose exports are all read-only (see :func:`read_only_info`)."""

    def __init__(self, inner: Catalogue) -> None:
        self.inner = inner

    def lookup(self, name: str) -> ExportInfo | None:
        info = self.inner.lookup(name)
        return None if info is None else read_only_info(info)

    def exports(self) -> Iterable[ExportInfo]:
        return [read_only_info(info) for info in self.inner.exports()]
