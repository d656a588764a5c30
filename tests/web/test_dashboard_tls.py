"""The dashboard reaches real agents over HTTPS only, checking their certificates with the cluster CA
(``--ca-file``) before the token leaves: with the CA both hosts are up; without it neither is, and an
``http://`` agent is refused before anything is sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from hikkoshi.agent.client import AgentError
from hikkoshi.web.agent_source import AgentsSource
from tests.support.agents import agents
from tests.support.dashboard import dashboard_proc


async def _hosts(source: AgentsSource) -> dict[str, tuple[str, str]]:
    try:
        overview = await source.overview()
    finally:
        await source.aclose()
    return {h.url: (h.name, h.state) for h in overview.hosts}


def test_the_dashboard_checks_the_agents_certificates(tmp_path: Path) -> None:
    with agents(tmp_path, "alpha", "beta") as (a, b):
        assert a.ca_file is not None
        token = a.token_file.read_text().strip()
        trusted = asyncio.run(_hosts(AgentsSource([a.url, b.url], token, ca_file=a.ca_file)))
        assert trusted == {a.url: ("alpha", "up"), b.url: ("beta", "up")}

        # Without the cluster CA the agents' certificates prove nothing: no host is read.
        source = AgentsSource([a.url, b.url], token)
        untrusted = asyncio.run(source.overview())
        asyncio.run(source.aclose())
        assert {h.state for h in untrusted.hosts} == {"unreachable"}
        assert all("certificate" in (h.error or "").lower() for h in untrusted.hosts), untrusted.hosts

        plain = a.url.replace("https://", "http://")
        with pytest.raises(AgentError, match="https"):
            AgentsSource([plain], token, ca_file=a.ca_file)

        # The command: logged in with the token, its pages show both hosts, read over HTTPS.
        args = ["--agent", a.url, "--agent", b.url, "--token-file", str(a.token_file)]
        with (
            dashboard_proc(tmp_path / "dashboard.log", *args, "--ca-file", str(a.ca_file)) as base,
            httpx.Client(base_url=base, trust_env=False) as web,
        ):
            assert web.post("/login", data={"token": token}).status_code == 303
            page = web.get("/").text
        assert "alpha" in page and "beta" in page and "unreachable" not in page
