"""What a server says about one export during negotiation (pure data)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from hikkoshi.nbd.constants import BASE_ALLOCATION, MAX_PAYLOAD


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """Negotiation facts of one export: name, size, transmission flags, block sizes, meta contexts."""

    name: str
    size: int
    flags: int
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)


class Catalogue(Protocol):
    """The exports a server offers, as the handshake sees them."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export of that name (the empty name means the default export), or None."""
        ...

    def exports(self) -> Iterable[ExportInfo]:
        """Every export, for NBD_OPT_LIST."""
        ...


def match_contexts(available: Iterable[str], query: str, *, allow_prefix: bool) -> list[str]:
    """Meta context names selected by one query.

    A query is an exact name, or (for LIST only) a namespace prefix ending in ':' that selects every
    context in that namespace.
    """
    names = list(available)
    if allow_prefix and query.endswith(":"):
        return [n for n in names if n.startswith(query)]
    return [n for n in names if n == query]
