"""NBD URIs (the form qemu, libnbd and nbdkit use): nbd[s]://HOST[:PORT]/EXPORT, nbd[s]+unix:///EXPORT?socket=PATH."""

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

    @classmethod
    def parse(cls, text: str) -> NbdUri:
        parts = urllib.parse.urlsplit(text)
        scheme = parts.scheme
        if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
            raise ValueError(f"not an NBD URI: {text!r} (expected nbd://, nbds://, nbd+unix://)")
        tls = scheme.startswith("nbds")
        export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        query = urllib.parse.parse_qs(parts.query)
        if scheme.endswith("+unix"):
            sockets = query.get("socket")
            if not sockets:
                raise ValueError(f"{text!r}: a +unix URI needs ?socket=PATH")
            return cls(export=export, socket=Path(sockets[0]), tls=tls)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{text!r}: bad port") from None
        return cls(export=export, host=parts.hostname or "127.0.0.1", port=port, tls=tls)

    def __str__(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        name = urllib.parse.quote(self.export)
        if self.socket is not None:
            return f"{scheme}+unix:///{name}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{name}"
