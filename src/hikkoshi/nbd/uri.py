"""NBD URIs (the form qemu, libnbd and nbdkit use): nbd[s]://HOST[:PORT]/EXPORT, nbd[s]+unix:///EXPORT?socket=PATH.

``nbds://HOST:PORT/EXPORT?tls-hostname=NAME`` connects to HOST but expects the server's certificate to
name NAME (a migration reaches a peer by its address and knows it by its host name), as QEMU's
``tls-hostname`` does."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 10809


@dataclass(frozen=True, slots=True)
class NbdUri:
    """Where an export is and how to reach it."""

    export: str = ""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    socket: Path | None = None
    tls: bool = False
    tls_hostname: str | None = None
    """The name the server's certificate must have (default: the host connected to)."""

    @classmethod
    def parse(cls, text: str) -> NbdUri:
        parts = urllib.parse.urlsplit(text)
        scheme = parts.scheme
        if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
            raise ValueError(f"not an NBD URI: {text!r} (expected nbd://, nbds://, nbd+unix://)")
        tls = scheme.startswith("nbds")
        export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        query = urllib.parse.parse_qs(parts.query)
        names = query.get("tls-hostname")
        tls_hostname = names[0] if names else None
        if tls_hostname is not None and not tls:
            raise ValueError(f"{text!r}: tls-hostname goes with nbds://")
        if scheme.endswith("+unix"):
            sockets = query.get("socket")
            if not sockets:
                raise ValueError(f"{text!r}: a +unix URI needs ?socket=PATH")
            return cls(export=export, socket=Path(sockets[0]), tls=tls, tls_hostname=tls_hostname)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{text!r}: bad port") from None
        host = parts.hostname or "127.0.0.1"
        return cls(export=export, host=host, port=port, tls=tls, tls_hostname=tls_hostname)

    def __str__(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        name = urllib.parse.quote(self.export)
        expect = f"tls-hostname={urllib.parse.quote(self.tls_hostname)}" if self.tls_hostname else ""
        if self.socket is not None:
            return f"{scheme}+unix:///{name}?socket={self.socket}" + (f"&{expect}" if expect else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{name}" + (f"?{expect}" if expect else "")

    @property
    def server_name(self) -> str | None:
        """The name the server's TLS certificate is checked against (``None`` for a Unix socket without
        ``tls-hostname``)."""
        if self.tls_hostname is not None:
            return self.tls_hostname
        return None if self.socket is not None else self.host
