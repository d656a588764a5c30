"""`hikkoshi cluster init` and `cluster issue`, as a person runs them: the CA's key and every host key
private (0600, the CA's directory 0700), certificates two hosts can use for mutual TLS (each proving its
own name), and clear refusals (no overwrite, bad names and addresses, no CA)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from hikkoshi.identity.credentials import HostCredentials
from hikkoshi.identity.names import peer_name
from tests.support.cluster_cli import in_process

CapSys = pytest.CaptureFixture[str]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _handshake(server: HostCredentials, client: HostCredentials, name: str) -> tuple[str, str]:
    """The names each side's certificate proves to the other (client asks for host ``name``)."""
    seen: list[str | None] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_name(writer.get_extra_info("peercert")))
        writer.close()

    srv = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server.server_context())
    port = srv.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client.client_context(), server_hostname=name
        )
        proved = peer_name(writer.get_extra_info("peercert"))
        writer.close()
        await asyncio.sleep(0.1)
    finally:
        srv.close()
        await srv.wait_closed()
    return str(proved), str(seen[0] if seen else None)


def test_init_and_issue_make_a_usable_private_cluster_identity(tmp_path: Path, capsys: CapSys) -> None:
    ca = tmp_path / "ca"
    r = in_process(capsys, "cluster", "init", str(ca))
    assert r.code == 0 and "keep it safe" in r.out, r
    assert _mode(ca) == 0o700 and _mode(ca / "ca-key.pem") == 0o600
    for host in ("alpha", "beta"):
        r = in_process(
            capsys,
            "cluster",
            "issue",
            host,
            "--ca",
            str(ca),
            "--out",
            str(tmp_path / host),
            "--address",
            "127.0.0.1",
        )
        assert r.code == 0 and f"host {host}" in r.out, r
        assert _mode(tmp_path / host / "host-key.pem") == 0o600

    def creds(host: str) -> HostCredentials:
        d = tmp_path / host
        return HostCredentials.load(d / "host-cert.pem", d / "host-key.pem", d / "ca-cert.pem")

    assert asyncio.run(_handshake(creds("beta"), creds("alpha"), "beta")) == ("beta", "alpha")

    # Refused, with the reason, and nothing written or overwritten.
    key = (tmp_path / "alpha" / "host-key.pem").read_bytes()
    for args, reason in (
        (["issue", "alpha", "--ca", str(ca), "--out", str(tmp_path / "alpha")], "exists already"),
        (["issue", "Not_A_Host", "--ca", str(ca), "--out", str(tmp_path / "x")], "host"),
        (["issue", "gamma", "--ca", str(ca), "--out", str(tmp_path / "g"), "--address", "gamma.lan"], "IP"),
        (["issue", "gamma", "--ca", str(tmp_path / "none"), "--out", str(tmp_path / "g")], "none"),
        (["init", str(ca)], "ca"),
    ):
        r = in_process(capsys, "cluster", *args)
        assert r.code == 2 and reason in r.err, (args, r)
    assert (tmp_path / "alpha" / "host-key.pem").read_bytes() == key
    assert not (tmp_path / "x").exists() and not (tmp_path / "g" / "host-cert.pem").exists()
