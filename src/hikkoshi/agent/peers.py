"""How this agent reaches another host's agent: mutual TLS, the peer known by the host name its
certificate names (issued by the cluster CA), never by the URL a request gave; no token is ever sent to
a peer. This is the one place a client of a peer is made: whoever knows a peer's host name and address
(a migration request, a record, the cluster's directory) calls :func:`peer_client`.

A peer whose name is not known yet (``migrate --to https://10.0.0.2:8710``) is asked to prove who it
is first (:func:`identify`): a TLS handshake checked against the cluster CA, nothing sent; from then on
every request checks that name before it sends a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse

from hikkoshi.agent.client import DEFAULT_TIMEOUT, AgentClient, AgentError
from hikkoshi.identity.credentials import HostCredentials
from hikkoshi.identity.names import check_host_name, is_ip, peer_name

#: One request to a peer; a peer silent for longer is taken for unreachable (and asked again later).
PEER_TIMEOUT = 15.0


class PeerError(AgentError):
    """The address does not answer as a host of this cluster."""


def _origin(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise PeerError(0, f"{url}: agents talk to each other over https:// only")
    try:
        return parts.hostname, parts.port or 443
    except ValueError:
        raise PeerError(0, f"{url}: bad port") from None


def peer_client(
    creds: HostCredentials, url: str, name: str, *, timeout: float = DEFAULT_TIMEOUT
) -> AgentClient:
    """A client of host ``name``'s agent at ``url``: this host's certificate is shown, and the agent's
    must be of the cluster CA and name ``name`` before anything is sent."""
    _origin(url)
    return AgentClient(
        url, None, timeout=timeout, tls=creds.client_context(), server_name=check_host_name(name)
    )


async def identify(creds: HostCredentials, url: str) -> str:
    """The host name the agent at ``url`` proves with its certificate (checked against the cluster CA;
    nothing is sent); :class:`PeerError` if it is not a host of this cluster."""
    host, port = _origin(url)
    ctx = creds.client_context()
    ctx.check_hostname = False  # the name is what we learn here; the CA is still checked
    try:
        async with asyncio.timeout(PEER_TIMEOUT):
            _reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise PeerError(0, f"{url} did not prove to be a host of this cluster: {exc or 'timeout'}") from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        name = peer_name(ssl_object.getpeercert() if ssl_object is not None else None)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if name is None:
        raise PeerError(0, f"{url}: its certificate names no host")
    return name


async def connect_peer(creds: HostCredentials, url: str, name: str | None = None) -> AgentClient:
    """A client of the agent at ``url``: of host ``name`` if given, else of the host ``url`` names (a DNS
    name), else of whichever host of the cluster it proves to be."""
    host, _port = _origin(url)
    if name is None:
        name = host if not is_ip(host) and host != "localhost" else await identify(creds, url)
    return peer_client(creds, url, name)
