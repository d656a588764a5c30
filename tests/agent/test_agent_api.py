"""The agent's HTTP API against a real agent process: the token is required everywhere, and the API
fuzzed from its own OpenAPI schema (schemathesis) answers 2xx or a clear 4xx, never a 5xx, and the
agent survives it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.support.agents import AgentProc, agents
from tests.support.pki import Pki
from tests.support.pki import pki as pki


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    """One agent with two datastores, a stopped VM and nothing else."""
    tmp = tmp_path_factory.mktemp("agent")
    with agents(tmp, "fuzzed") as (a,):
        a.cli("vm", "create", "resident", "--memory", "64", "--kernel", "/bin/true", "--no-nic")
        yield a
        assert a.proc is not None and a.proc.poll() is None, "the agent died"


def _auth(agent: AgentProc) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.token_file.read_text().strip()}"}


@pytest.fixture(scope="module")
def api_schema(agent: AgentProc) -> Any:
    schema = httpx.get(f"{agent.url}/v1/openapi.json", headers=_auth(agent)).json()
    # Agent-to-agent steps that would start processes for a migration nobody runs are fuzzed too; the
    # build of the test guest is slow and has no input: left out.
    return schemathesis.openapi.from_dict(schema).exclude(path="/v1/guest/build")


def test_every_route_needs_the_token(agent: AgentProc) -> None:
    schema = httpx.get(f"{agent.url}/v1/openapi.json", headers=_auth(agent)).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    assert len(routes) >= 20
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method, path in [*routes, ("GET", "/v1/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")]:
            url = agent.url + path.replace("{name}", "resident").replace("{migration_id}", "abc")
            r = httpx.request(method, url, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    ok = httpx.get(f"{agent.url}/v1/vms/resident", headers=_auth(agent))
    assert ok.status_code == 200 and ok.json()["name"] == "resident"


def test_clear_errors(agent: AgentProc) -> None:
    auth = _auth(agent)

    def call(method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, agent.url + path, headers=auth, **kw)

    r = call("GET", "/v1/vms/nosuch")
    assert r.status_code == 404 and "no VM named 'nosuch'" in r.json()["detail"]
    r = call("POST", "/v1/vms", json={"name": "../etc", "memory_mib": 64})
    assert r.status_code == 422
    r = call("POST", "/v1/vms", json={"name": "x", "memory_mib": 64, "surprise": 1})
    assert r.status_code == 422
    r = call("POST", "/v1/vms/resident/stop", json={})
    assert r.status_code == 409 and "not running" in r.json()["detail"]
    r = call("POST", "/v1/vms/resident/migrate", json={"to": "http://127.0.0.1:9", "mode": "offline"})
    assert r.status_code == 424 and "destination agent http://127.0.0.1:9" in r.json()["detail"]
    r = call("DELETE", "/v1/incoming/resident")
    assert r.status_code == 404, "a peer must never delete a VM that is not coming in"
    assert call("GET", "/v1/vms/resident").status_code == 200
    r = call("PUT", "/v1/incoming/newvm/home", content=b"not a tar archive")
    assert r.status_code == 422 and "home files" in r.json()["detail"]
    assert not (agent.datastores["main"] / "newvm").exists()
    r = call("GET", "/v1/migrations/abcdef")
    assert r.status_code == 404


def test_fuzzed_from_the_schema(api_schema: Any, agent: AgentProc) -> None:
    """Every operation, with cases generated from its schema (valid and invalid ones alike)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    seen: dict[str, set[int]] = {}

    @settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of([op.as_strategy() for op in operations]))
    def check(case: Any) -> None:
        response = case.call(base_url=agent.url, headers=_auth(agent), timeout=60)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
        assert response.status_code != 401
        seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

    check()
    assert len(seen) >= len(operations) // 2, seen  # the run reached most operations
    assert any(400 <= code < 500 for codes in seen.values() for code in codes)


def test_api_over_tls(tmp_path: Path, pki: Pki) -> None:
    """With --tls-cert/--tls-key the API is HTTPS only: the CLI verifies the agent's certificate."""
    agent = AgentProc(
        "secure",
        tmp_path / "secure",
        tmp_path / "token",
        {"main": tmp_path / "secure" / "ds"},
        extra=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)],
        ca_file=pki.ca,
    )
    agent.start()
    try:
        assert agent.url.startswith("https://127.0.0.1:")
        assert agent.json("vm", "list", "--json") == []
        plain = agent.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/v1/host", headers=_auth(agent), timeout=10)
        unverified = AgentProc("x", tmp_path / "x", agent.token_file, {}, url=agent.url)
        refused = unverified.cli("vm", "list", check=False)  # the system CAs do not know our test CA
        assert refused.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    finally:
        agent.stop()
