"""Parsing ``HOST:PORT``, ``[V6]:PORT``, ``PORT`` and ``unix:PATH`` addresses (servers, relays, labs)."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int, str | None]:
    """Return (host, port, unix path); the host defaults to loopback, never to all interfaces."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise ValueError("unix: needs a path")
        return DEFAULT_HOST, 0, text[5:]
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = DEFAULT_HOST, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad address {text!r}: write an IPv6 host in brackets, [::1]:PORT")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT or unix:PATH") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host or DEFAULT_HOST, number, None
