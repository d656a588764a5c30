"""The agent's HTTP API against a real agent process: HTTPS only; the user routes need the token, the
peer routes a host certificate of the cluster (and never take the token); the API fuzzed from its own
OpenAPI schema (schemathesis), as a person with the token and as another host of the cluster, answers
2xx or a clear 4xx, never a 5xx, and the agent survives it."""

from __future__ import annotations

import ssl
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

from hikkoshi.identity.authority import issue_host, make_ca
from tests.support.agents import AgentProc, agents, cluster_ca, kernel

PEER_PREFIXES = ("/v1/incoming/", "/v1/held/", "/v1/peer/")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent")


@pytest.fixture(scope="module")
def agent(tmp: Path) -> Iterator[AgentProc]:
    """One agent with a stopped VM and nothing else."""
    with agents(tmp, "fuzzed") as (a,):
        a.cli("vm", "create", "resident", "--memory", "64", "--kernel", kernel(tmp), "--no-nic")
        yield a
        assert a.proc is not None and a.proc.poll() is None, "the agent died"


@pytest.fixture(scope="module")
def mallory(tmp: Path) -> Path:
    """Another host of the same cluster (``host-cert.pem``, ``host-key.pem``, ``ca-cert.pem``)."""
    out = tmp / "pki" / "mallory"
    issue_host(cluster_ca(tmp), "mallory", out, ["127.0.0.1"])
    return out


@pytest.fixture(scope="module")
def rogue(tmp: Path) -> Path:
    """A host of the same name as the agent, by another CA."""
    make_ca(tmp / "rogue-ca")
    out = tmp / "rogue"
    issue_host(tmp / "rogue-ca", "fuzzed", out, ["127.0.0.1"])
    return out


def _auth(agent: AgentProc) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.token_file.read_text().strip()}"}


def _as_host(agent: AgentProc, ids: Path) -> httpx.Client:
    """A client showing the host certificate in ``ids`` (the agent's checked against the cluster CA)."""
    ctx = ssl.create_default_context(cafile=agent.ca_file)
    ctx.load_cert_chain(ids / "host-cert.pem", ids / "host-key.pem")
    return httpx.Client(base_url=agent.url, verify=ctx, timeout=60)


def _routes(agent: AgentProc) -> list[tuple[str, str]]:
    schema = agent.request("GET", "/v1/openapi.json").json()
    return [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]


def _concrete(path: str) -> str:
    return (
        path.replace("{name}", "resident")
        .replace("{migration_id}", "abc")
        .replace("{disk}", "disk0")
        .replace("{action}", "pause")
    )


@pytest.fixture(scope="module")
def api_schema(agent: AgentProc) -> Any:
    schema = agent.request("GET", "/v1/openapi.json").json()
    # The build of the test guest is slow and has no input: left out.
    return schemathesis.openapi.from_dict(schema).exclude(path="/v1/guest/build")


def test_every_user_route_needs_the_token(agent: AgentProc, mallory: Path) -> None:
    routes = [r for r in _routes(agent) if not r[1].startswith(PEER_PREFIXES)]
    assert len(routes) >= 14
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method, path in [*routes, ("GET", "/v1/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")]:
            url = agent.url + _concrete(path)
            r = httpx.request(method, url, headers=headers, json={}, verify=agent.verify())
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    # A host of the cluster is no person: its certificate does not open the user routes.
    with _as_host(agent, mallory) as host:
        assert host.get("/v1/vms").status_code == 401
        assert host.post("/v1/vms/resident/start").status_code == 401
    ok = agent.request("GET", "/v1/vms/resident")
    assert ok.status_code == 200 and ok.json()["name"] == "resident"


def test_every_peer_route_needs_a_cluster_certificate(agent: AgentProc, rogue: Path) -> None:
    """The token opens no peer route (it may have leaked; a peer never sends it); another CA's
    certificate does not even get through the handshake."""
    routes = [r for r in _routes(agent) if r[1].startswith(PEER_PREFIXES)]
    assert len(routes) >= 20
    for method, path in routes:
        r = agent.request(method, _concrete(path), json={})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "host certificate of the cluster" in r.json()["detail"]
    with _as_host(agent, rogue) as impostor, pytest.raises(httpx.HTTPError):
        impostor.get("/v1/peer/host")
    assert agent.request("GET", "/v1/vms/resident").json()["state"] == "stopped"


def test_a_peer_is_known_by_its_certificate(agent: AgentProc, mallory: Path) -> None:
    """Another host of the cluster sees only what a peer may: it never finds this host's own VMs, nor
    removes one, nor anything of a migration it did not start."""
    with _as_host(agent, mallory) as host:
        me = host.get("/v1/peer/host").json()
        assert me["name"] == "fuzzed" and me["encrypts"] is True and me["datastores"] == ["main"]
        for method, path in (
            ("DELETE", "/v1/incoming/resident"),
            ("GET", "/v1/incoming/resident/status"),
            ("POST", "/v1/incoming/resident/resume"),
            ("POST", "/v1/incoming/resident/finish"),
            ("GET", "/v1/incoming/resident/spec"),
        ):
            r = host.request(method, path)
            assert r.status_code == 404 and "from mallory" in r.json()["detail"], (path, r.text)
        r = host.post("/v1/held/resident/release", json={"migration": "abc"})
        assert r.status_code == 409 and "for mallory" in r.json()["detail"]
        assert host.get("/v1/peer/migrations/abc").status_code == 404
        facts = host.get("/v1/incoming/resident").json()
        assert facts["home_exists"] is True and facts["holds_vm"] is False and facts["uuid"] is None
    shown = agent.request("GET", "/v1/vms/resident").json()
    assert shown["state"] == "stopped" and (agent.datastores["main"] / "resident" / "vm.toml").exists()


def test_api_over_tls_only(agent: AgentProc, tmp: Path) -> None:
    assert agent.url.startswith("https://127.0.0.1:")
    assert agent.json("vm", "list", "--json")[0]["name"] == "resident"
    plain = agent.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/v1/host", headers=_auth(agent), timeout=10)
    unverified = AgentProc("x", tmp / "x", agent.token_file, {}, url=agent.url)
    refused = unverified.cli("vm", "list", check=False)  # the system CAs do not know the cluster's
    assert refused.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    # The CLI sends the token over HTTPS only, after the agent's certificate was checked.
    for url in ("http://192.0.2.1:8710", plain):
        said = AgentProc("x", tmp / "x", agent.token_file, {}, url=url).cli("vm", "list", check=False)
        assert said.returncode == 3 and "over https:// only" in said.stderr


def test_clear_errors(agent: AgentProc, mallory: Path) -> None:
    def call(method: str, path: str, **kw: Any) -> httpx.Response:
        response: httpx.Response = agent.request(method, path, **kw)
        return response

    r = call("GET", "/v1/vms/nosuch")
    assert r.status_code == 404 and "no VM named 'nosuch'" in r.json()["detail"]
    r = call("POST", "/v1/vms", json={"name": "../etc", "memory_mib": 64})
    assert r.status_code == 422
    r = call("POST", "/v1/vms", json={"name": "x", "memory_mib": 64, "surprise": 1})
    assert r.status_code == 422
    r = call("POST", "/v1/vms/resident/stop", json={})
    assert r.status_code == 409 and "not running" in r.json()["detail"]
    r = call("POST", "/v1/vms/resident/migrate", json={"to": "https://127.0.0.1:9", "mode": "offline"})
    assert r.status_code == 424 and "destination agent https://127.0.0.1:9" in r.json()["detail"]
    r = call("POST", "/v1/vms/resident/migrate", json={"to": "http://127.0.0.1:9", "mode": "offline"})
    assert r.status_code == 422  # agents talk to each other over HTTPS only
    # Sizes and numbers beyond what a host can do: refused with the reason, nothing left behind.
    for disk in ("1P", "999999999999G", "1P:thick"):
        r = call(
            "POST",
            "/v1/vms",
            json={"name": "big", "memory_mib": 64, "disks": [disk], "kernel": kernel(agent.root.parent)},
        )
        assert 400 <= r.status_code < 500 and r.json()["detail"], (disk, r.status_code, r.text)
        assert not (agent.datastores["main"] / "big").exists()
    r = call("GET", "/v1/vms/resident/console", params={"offset": 1 << 50})
    assert r.status_code == 200 and r.content == b""
    with _as_host(agent, mallory) as host:
        r = host.put("/v1/incoming/newvm/home", content=b"not a tar archive")
        assert r.status_code == 422 and "home files" in r.json()["detail"]
    assert not (agent.datastores["main"] / "newvm").exists()
    r = call("GET", "/v1/migrations/abcdef")
    assert r.status_code == 404


def _fuzz(
    api_schema: Any, agent: AgentProc, *, peers: bool, examples: int, **auth: Any
) -> dict[str, set[int]]:
    operations = [
        op
        for result in api_schema.get_all_operations()
        if (op := result.ok()).path.startswith(PEER_PREFIXES) == peers
    ]
    seen: dict[str, set[int]] = {}

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of([op.as_strategy() for op in operations]))
    def check(case: Any) -> None:
        response = case.call(base_url=agent.url, timeout=60, verify=str(agent.ca_file), **auth)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
        assert response.status_code not in (401, 403)
        seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

    check()
    assert len(seen) >= len(operations) // 2, seen  # the run reached most operations
    assert any(400 <= code < 500 for codes in seen.values() for code in codes)
    return seen


def test_user_routes_fuzzed_from_the_schema(api_schema: Any, agent: AgentProc) -> None:
    """Every user operation, with cases generated from its schema (valid and invalid ones alike)."""
    _fuzz(api_schema, agent, peers=False, examples=500, headers=_auth(agent))


def test_peer_routes_fuzzed_from_the_schema(api_schema: Any, agent: AgentProc, mallory: Path) -> None:
    """Every peer operation, as another host of the cluster: typed, bound to that host; nothing of
    this host's changes."""
    before = sorted(p.name for p in agent.datastores["main"].iterdir())
    cert = (str(mallory / "host-cert.pem"), str(mallory / "host-key.pem"))
    _fuzz(api_schema, agent, peers=True, examples=500, cert=cert)
    after = sorted(p.name for p in agent.datastores["main"].iterdir())
    assert after == before
    assert agent.request("GET", "/v1/vms/resident").json()["state"] == "stopped"
