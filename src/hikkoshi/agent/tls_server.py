"""The agent's API over TLS with the host's certificate, and who is calling: a client certificate of
the cluster CA (another agent) is checked in the handshake, and the host it names is handed to every
request of that connection (:func:`peer_of_request`); a client without one (a person, a script) is
let in and must show the token.

uvicorn does not pass the client's certificate to the application, so its HTTP protocol is extended
here: the connection's verified peer name goes into the request state uvicorn copies into every
request's scope. Nothing a client sends can set it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from hikkoshi.identity.credentials import HostCredentials
from hikkoshi.identity.names import peer_name

_PEER = "hikkoshi_peer"


class PeerAwareProtocol(H11Protocol):
    """uvicorn's h11 protocol, remembering the connection's verified peer host (see the module)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        peer = peer_name(ssl_object.getpeercert()) if ssl_object is not None else None
        # This connection's own copy: uvicorn copies it into each request's scope["state"].
        self.app_state = {**self.app_state, _PEER: peer}


def peer_of_request(request: Request) -> str | None:
    """The cluster host whose certificate the request came with (``None``: no certificate)."""
    state: Any = request.scope.get("state") or {}
    peer = state.get(_PEER)
    return peer if isinstance(peer, str) else None


def api_ssl_context(creds: HostCredentials) -> ssl.SSLContext:
    """The API's TLS: the host's certificate; a client certificate of the cluster CA is checked if
    shown (another agent), and not required (people use the token)."""
    return creds.server_context(client_certificate="optional")
