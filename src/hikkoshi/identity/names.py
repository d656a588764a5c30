"""Host names and addresses as hikkoshi trusts them. Pure.

A host name is what a host certificate names (its common name and a DNS subject alternative name),
what QEMU's ``tls-hostname`` checks and what a peer is known by: lower-case letters, digits, ``-`` and
``.``, like a DNS name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The organisation of every certificate the cluster CA issues (see :mod:`~hikkoshi.identity.authority`).
ORGANIZATION = "hikkoshi cluster"

_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def check_host_name(name: str) -> str:
    """``name`` if it can name a host in a certificate, else :class:`ValueError` saying why."""
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} cannot name a host: use lower-case letters, digits, '-' and '.' (a DNS name)"
        )
    if is_ip(name):
        raise ValueError(f"{name!r} is an address, not a host name")
    return name


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (brackets allowed)."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every address of the host (``0.0.0.0``, ``::``, or empty)."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _subject_field(peercert: Mapping[str, Any], key: str) -> str | None:
    # ssl.getpeercert(): subject is a tuple of relative distinguished names, each a tuple of pairs.
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == key:
                return str(value)
    return None


def dns_names(peercert: Mapping[str, Any]) -> list[str]:
    """The DNS subject alternative names of a certificate as :meth:`ssl.SSLSocket.getpeercert` gives it."""
    sans: Sequence[tuple[str, str]] = peercert.get("subjectAltName", ())
    return [value for kind, value in sans if kind == "DNS"]


def peer_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The host a verified peer certificate names: its common name, if that is a host name and also
    one of its DNS names (as ``hikkoshi cluster issue`` makes them); else ``None``."""
    if not peercert:
        return None
    name = _subject_field(peercert, "commonName")
    if name is None or name not in dns_names(peercert):
        return None
    try:
        return check_host_name(name)
    except ValueError:
        return None


def qemu_identity(host: str) -> str:
    """The distinguished name of ``host``'s certificate as QEMU's ``tls-authz`` compares it (GnuTLS
    writes it in certificate order: the organisation, then the common name)."""
    return f"O={ORGANIZATION},CN={check_host_name(host)}"
