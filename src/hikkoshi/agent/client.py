"""A client of an agent's API: a person's or a script's, with the token (the CLI), or another agent's,
with its host certificate and no token (made only by :mod:`hikkoshi.agent.peers`)."""

from __future__ import annotations

import os
import ssl
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

#: How long one request may take; long jobs are started and then polled, never awaited in a request.
DEFAULT_TIMEOUT = 120.0


class AgentError(RuntimeError):
    """The agent refused the request or could not be reached; ``status`` is the HTTP status (0: no
    answer)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def read_token(path: Path) -> str:
    """The token in ``path`` (one line); a clear error if it is missing, empty, or open to others (the
    token lets whoever reads it run VMs on the host)."""
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise AgentError(0, f"token file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise AgentError(
            0,
            f"token file {path} is open to others (mode {stat.S_IMODE(mode):04o}): make it readable by its "
            f"owner only (chmod 600 {path})",
        )
    if not token:
        raise AgentError(0, f"token file {path} is empty")
    return token


def check_token_url(url: str) -> str:
    """``url`` if the token may be sent there: HTTPS only, the agent's certificate checked before the
    token leaves (against ``--ca-file``, the cluster CA); agents serve nothing else."""
    if urllib.parse.urlsplit(url).scheme == "https":
        return url
    raise AgentError(0, f"{url}: the token goes to an agent over https:// only (its certificate is checked)")


class AgentClient:
    """Requests to one agent: with ``token`` (people and scripts), or with ``tls`` showing this host's
    certificate and ``server_name`` the name the agent's certificate must have (agents)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.server_name = server_name
        verify: Any = True
        if tls is not None:
            verify = tls
        elif ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise AgentError(0, f"CA file {ca_file}: {exc}") from None
        if token is not None:
            check_token_url(self.url)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"} if token is not None else {},
            timeout=timeout,
            verify=verify,
            trust_env=False,  # never through a proxy from the environment: agents are peers
        )

    @classmethod
    def from_env(cls, url: str | None, token_file: Path | None, ca_file: Path | None = None) -> AgentClient:
        """A client from options, else ``HIKKOSHI_AGENT`` / ``HIKKOSHI_TOKEN_FILE`` / ``HIKKOSHI_CA_FILE``."""
        url = url or os.environ.get("HIKKOSHI_AGENT")
        if not url:
            raise AgentError(0, "no agent: give --agent URL or set HIKKOSHI_AGENT")
        tf = token_file or (
            Path(os.environ["HIKKOSHI_TOKEN_FILE"]) if "HIKKOSHI_TOKEN_FILE" in os.environ else None
        )
        if tf is None:
            raise AgentError(0, "no token: give --token-file F or set HIKKOSHI_TOKEN_FILE")
        ca = ca_file or (Path(os.environ["HIKKOSHI_CA_FILE"]) if "HIKKOSHI_CA_FILE" in os.environ else None)
        return cls(url, read_token(tf), ca_file=ca)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        limit: float | None = None,
    ) -> httpx.Response:
        """One request (``limit``: seconds, instead of the client's); :class:`AgentError` unless it
        succeeded (2xx)."""
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                content=content,
                params=params,
                headers=headers,
                timeout=limit if limit is not None else httpx.USE_CLIENT_DEFAULT,
                # The agent's certificate must name this host (checked before anything is sent).
                extensions={"sni_hostname": self.server_name} if self.server_name else None,
            )
        except httpx.HTTPError as exc:
            raise AgentError(0, f"agent {self.url} does not answer: {exc or type(exc).__name__}") from None
        if response.is_success:
            return response
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if not isinstance(detail, str):
            detail = str(detail)
        raise AgentError(response.status_code, detail or response.reason_phrase)

    async def get(self, path: str, **params: Any) -> Any:
        """``GET`` returning JSON."""
        return (await self.request("GET", path, params=params or None)).json()

    async def post(self, path: str, body: Any = None, *, limit: float | None = None) -> Any:
        """``POST`` with a JSON body, returning JSON (``None`` for an empty answer)."""
        response = await self.request("POST", path, json=body if body is not None else {}, limit=limit)
        return response.json() if response.content else None

    async def delete(self, path: str) -> None:
        """``DELETE``."""
        await self.request("DELETE", path)
