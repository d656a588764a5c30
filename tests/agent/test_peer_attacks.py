"""An agent attacked through everything a peer can reach, the way the findings of issue 16 were made:
as a host of the same cluster that starts a migration into it ("alpha": a real incoming supervisor and
QEMU), as another host of the cluster ("mallory"), as a host of another CA, and as whoever can connect
to its ports. Each attack fails with a clear error and nothing changes on the host: no file made, no
process started or killed, no listener beyond the one asked for, no token sent.

Attacks: raw QMP, exec: URIs and control verbs through every peer route; a disk listener on 0.0.0.0
or a plan pointing the disks anywhere; /etc/shadow as a peer's kernel or initrd, a port forward on
every address; forged connections to an incoming QEMU's port and to its disk listener; the ordinary VM
API against the incoming VM; and the token asked to go to a foreign URL.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.identity.authority import issue_host, make_ca
from hikkoshi.migrate.home_archive import pack_home
from hikkoshi.nbd.client import NbdClient
from hikkoshi.vm.spec import parse_spec, spec_to_toml
from tests.support.agents import AgentProc, agents, cluster_ca, kernel
from tests.support.vms import alive, wait_dead
from tests.support.vms import guest as guest

PEER_PREFIXES = ("/v1/incoming/", "/v1/held/", "/v1/peer/")
MIGRATION = "a1b2c3d4e5f6"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attacked")


@pytest.fixture(scope="module")
def target(tmp: Path) -> Iterator[AgentProc]:
    """The attacked agent ("target"), with a VM of its own."""
    with agents(tmp, "target") as (a,):
        a.cli("vm", "create", "resident", "--memory", "64", "--kernel", kernel(tmp), "--no-nic")
        yield a
        assert a.proc is not None and a.proc.poll() is None, "the agent died"


@pytest.fixture(scope="module")
def hosts(tmp: Path) -> dict[str, Path]:
    """Host certificates: alpha and mallory of the cluster, and an impostor "alpha" of another CA."""
    out = {n: tmp / "pki" / n for n in ("alpha", "mallory")}
    for name, path in out.items():
        issue_host(cluster_ca(tmp), name, path, ["127.0.0.1"])
    make_ca(tmp / "rogue-ca")
    issue_host(tmp / "rogue-ca", "alpha", tmp / "rogue", ["127.0.0.1"])
    return {**out, "rogue": tmp / "rogue"}


def _client_context(ca: Path, ids: Path | None, *, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if ids is not None:
        ctx.load_cert_chain(ids / "host-cert.pem", ids / "host-key.pem")
    return ctx


def _as(agent: AgentProc, ids: Path) -> httpx.Client:
    assert agent.ca_file is not None
    return httpx.Client(base_url=agent.url, verify=_client_context(agent.ca_file, ids), timeout=120)


def _home(tmp: Path, guest: GuestImage, vm: str, **spec: Any) -> bytes:
    """A home's archive as a source sends it: the test guest's kernel and initrd in the home."""
    d = tmp / "homes" / f"{vm}-{len(list((tmp / 'homes').glob('*'))) if (tmp / 'homes').exists() else 0}"
    d.mkdir(parents=True)
    shutil.copy(guest.kernel, d / "vmlinux")
    shutil.copy(guest.initrd, d / "initrd.img")
    data: dict[str, Any] = {
        "name": vm,
        "memory_mib": 64,
        "accel": "tcg",
        "on_reboot": "poweroff",
        "disks": [{"name": "disk0", "size": "16M"}],
        "boot": {"kernel": "vmlinux", "initrd": "initrd.img", "append": "console=ttyS0"},
        **spec,
    }
    (d / "vm.toml").write_text(spec_to_toml(parse_spec(data)))
    return pack_home(d, {"disk0.raw"})


def _untouched(agent: AgentProc, vm: str) -> None:
    """Nothing of ``vm`` on the host: no home, no row, no process."""
    assert not (agent.datastores["main"] / vm).exists()
    assert vm not in {v["name"] for v in agent.json("vm", "list", "--json")}


# --- a peer's spec is checked as a user's is ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"boot": {"kernel": "/etc/shadow"}},
            "kernel /etc/shadow is outside the directories this host allows",
        ),
        (
            {"boot": {"kernel": "vmlinux", "initrd": "/etc/shadow"}},
            "initrd /etc/shadow is outside the directories this host allows",
        ),
        (
            {
                "nics": [
                    {
                        "network": "user",
                        "forwards": [{"host_address": "0.0.0.0", "host_port": 2222, "guest_port": 22}],
                    }
                ]
            },
            "a port forward from every address of the host (0.0.0.0:2222) is not allowed here",
        ),
        ({"name": "someone-else"}, "the spec names VM 'someone-else', not 'visitor'"),
    ],
)
def test_a_peers_spec_is_checked(
    target: AgentProc,
    hosts: dict[str, Path],
    guest: GuestImage,
    tmp: Path,
    spec: dict[str, Any],
    message: str,
) -> None:
    archive = _home(tmp, guest, "visitor", **spec)
    with _as(target, hosts["alpha"]) as alpha:
        r = alpha.put("/v1/incoming/visitor/home", content=archive, params={"datastore": "main"})
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    _untouched(target, "visitor")


@pytest.mark.parametrize("what", ["image", "kernel", "initrd"])
def test_host_files_are_not_a_users_either(target: AgentProc, tmp: Path, what: str) -> None:
    """/etc/shadow, directly or through a link in a directory the host allows: refused before it is read."""
    link = tmp / "files" / f"innocent-{what}"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/shadow")
    for path in ("/etc/shadow", str(link)):
        body: dict[str, Any] = {"name": "thief", "memory_mib": 64, "disks": ["16M"], "nics": ["none"]}
        body[what] = path
        if what == "initrd":
            body["kernel"] = kernel(tmp)
        r = target.request("POST", "/v1/vms", json=body)
        assert r.status_code == 400 and f"{what} {path} is outside the directories" in r.json()["detail"], (
            r.text
        )
        _untouched(target, "thief")


# --- a migration coming in, attacked at every step --------------------------------------------------------


def _forge_stream(port: int, ca: Path, hosts: dict[str, Path]) -> list[str]:
    """Connections to an incoming QEMU's port that are not the source: what each got."""
    outcomes = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        try:
            plain.sendall(b"QEVM\x00\x00\x00\x03" + b"\x00" * 64)  # a migration stream's header, in the clear
            outcomes.append(f"plain: {plain.recv(64)!r}")
        except OSError as exc:
            outcomes.append(f"plain: {type(exc).__name__}")
    for who in ("anonymous", "rogue", "mallory"):
        ids = None if who == "anonymous" else hosts[who]
        ctx = _client_context(ca, ids, verify=False)
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="target") as tls,
            ):
                tls.sendall(b"QEVM\x00\x00\x00\x03")
                outcomes.append(f"{who}: {tls.recv(64)!r}")
        except (ssl.SSLError, OSError) as exc:
            outcomes.append(f"{who}: {type(exc).__name__}")
    return outcomes


async def _nbd_read(address: str, ca: Path, ids: Path | None) -> bytes:
    ctx = _client_context(ca, ids)
    async with NbdClient(f"nbds://{address}/disk0?tls-hostname=target", tls=ctx, connect_timeout=10) as c:
        await c.write(0, b"x" * 512)
        return await c.read(0, 512)


@pytest.mark.slow
def test_an_incoming_migration_under_attack(
    target: AgentProc, hosts: dict[str, Path], guest: GuestImage, tmp: Path
) -> None:
    assert target.ca_file is not None
    ca = target.ca_file
    mark = tmp / "EXECUTED"
    home = target.datastores["main"] / "visitor"
    with _as(target, hosts["alpha"]) as alpha, _as(target, hosts["mallory"]) as mallory:
        base = "/v1/incoming/visitor"
        r = alpha.put(
            f"{base}/home", content=_home(tmp, guest, "visitor"), params={"source": "https://127.0.0.1:1"}
        )
        assert r.status_code == 200, r.text
        # Another host of the cluster: the VM is not there for it.
        for method, path in (("DELETE", ""), ("GET", "/status"), ("POST", "/resume"), ("GET", "/spec")):
            assert mallory.request(method, base + path).status_code == 404
        r = mallory.post(f"{base}/disks", json={"sizes": {"disk0.raw": 16 << 20}})
        assert r.status_code == 404 and not (home / "disk0.raw").exists()
        # The source's plan may point the disks at its own export over TLS only: not anywhere else.
        for upstream in (
            "exec:touch " + str(mark),
            "nbd://127.0.0.1:1/disk0",  # in the clear
            "nbds://127.0.0.1:1/disk0",  # no name to check
            "nbds://127.0.0.1:1/disk0?tls-hostname=mallory",  # a third host's
            "nbds+unix:///disk0?socket=/run/some.sock&tls-hostname=alpha",  # a local socket
        ):
            plan = {"disks": {"disk0": {"kind": "relocating", "upstream": upstream}}}
            r = alpha.put(f"{base}/plan", json=plan)
            assert r.status_code == 422, (upstream, r.text)
        held = {"kind": "remote", "upstream": "nbds://127.0.0.1:1/disk0?tls-hostname=alpha",
                "holder": {"host": "alpha", "home": "/var/lib/important"}}  # fmt: skip
        assert alpha.put(f"{base}/plan", json={"disks": {"disk0": held}}).status_code == 422
        listener = {"address": "0.0.0.0:10809", "read_only": False}
        assert alpha.put(f"{base}/plan", json={"listeners": [listener]}).status_code == 422
        assert not (home / "disks.json").exists()
        # The real steps of a precopy migration, then the attacks on what they opened.
        assert alpha.post(f"{base}/disks", json={"sizes": {"disk0.raw": 16 << 20}}).status_code == 204
        r = alpha.post(
            f"{base}/start", json={"accel": "tcg", "migration": MIGRATION, "source": "https://127.0.0.1:1"}
        )
        assert r.status_code == 200, r.text
        qemu_pid = r.json()["qemu_pid"]
        # The ordinary VM API does not touch a VM coming in.
        for method, path in (("POST", "/start"), ("POST", "/stop"), ("DELETE", "")):
            r = target.request(method, f"/v1/vms/visitor{path}", json={})
            assert r.status_code == 409 and "coming in from another host" in r.json()["detail"], (
                path,
                r.text,
            )
        r = target.request("POST", "/v1/vms/visitor/migrate", json={"to": "https://127.0.0.1:1"})
        assert r.status_code == 409
        # Raw QMP, exec: URIs and control verbs through every peer route, from the migration's own source.
        raw = {
            "execute": "migrate-incoming",
            "arguments": {"uri": f"exec:touch {mark}"},
            "uri": f"exec:touch {mark}",
            "command": "qmp",
            "target": "supervisor",
            "args": {"execute": "migrate-incoming", "arguments": {"uri": f"exec:touch {mark}"}},
            "address": "0.0.0.0:0",
            "to": str(tmp / "stolen.raw"),
            "home": "/",
        }
        schema = target.request("GET", "/v1/openapi.json").json()
        for path, ops in schema["paths"].items():
            if not path.startswith(PEER_PREFIXES):
                continue
            for method in ops:
                url = path.replace("{name}", "visitor").replace("{migration_id}", MIGRATION)
                url = url.replace("{disk}", "disk0").replace("{action}", "invalidate")
                if method not in ("post", "put") or url.endswith(
                    ("/resume", "/finish", "/announce", "/stream/listen")
                ):
                    continue  # no body to carry it (those four are asked for real, or not at all, below)
                r = alpha.request(method.upper(), url, json=raw)
                assert r.status_code in (404, 409, 422), (method, url, r.status_code, r.text)
        assert not mark.exists() and not (tmp / "stolen.raw").exists()
        # The memory stream: TLS, or nothing (this host encrypts).
        # "Committed" is for a migration whose VM died here before it resumed: not a live one, not another.
        r = alpha.post(f"{base}/committed", json={"migration": MIGRATION})
        assert r.status_code == 409 and "resumed, not started again" in r.text, r.text
        assert alpha.post(f"{base}/committed", json={"migration": "ffff"}).status_code == 409
        assert mallory.post(f"{base}/committed", json={"migration": MIGRATION}).status_code == 404
        assert alpha.post(f"{base}/stream", json={"tls": False}).status_code == 409
        assert alpha.post(f"{base}/stream", json={"tls": True}).status_code == 204
        where = alpha.post(f"{base}/stream/listen").json()
        assert where["host"] == "127.0.0.1"
        outcomes = _forge_stream(int(where["port"]), ca, hosts)
        assert all("QEVM" not in o for o in outcomes), outcomes
        # The incoming QEMU lives on, still waiting for its source; it said why it refused mallory.
        status = alpha.get(f"{base}/status").json()
        assert status["state"] == "inmigrate" and status["qemu_pid"] == qemu_pid and alive(qemu_pid)
        assert alpha.get(f"{base}/stream").json().get("status") not in ("failed", "active", "completed")
        assert "authz check for O=hikkoshi cluster,CN=mallory is denied" in (home / "qemu.log").read_text()
        with socket.create_connection(("127.0.0.1", int(where["port"])), timeout=10):
            pass  # and it still listens for the real one
        # The disk listener for the source's mirror: on the migration address, for alpha only.
        r = alpha.post(f"{base}/disk-listener", json={"migration": MIGRATION, "address": "0.0.0.0:0"})
        assert r.status_code == 422
        assert alpha.post(f"{base}/disk-listener", json={"migration": "ffff"}).status_code == 409
        assert (
            alpha.post(f"{base}/disk-listener", json={"migration": MIGRATION, "tls": False}).status_code
            == 409
        )
        address = alpha.post(f"{base}/disk-listener", json={"migration": MIGRATION}).json()["address"]
        assert address.startswith("127.0.0.1:")
        before = (home / "disk0.raw").read_bytes()[:512]
        for who in (None, hosts["mallory"], hosts["rogue"]):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                asyncio.run(_nbd_read(address, ca, who))
        assert (home / "disk0.raw").read_bytes()[:512] == before
        assert asyncio.run(_nbd_read(address, ca, hosts["alpha"])) == b"x" * 512  # the mirror writes
        # Rolled back by its source: everything goes.
        assert alpha.delete(base).status_code == 204
    assert not home.exists() and wait_dead([qemu_pid], 20) == []
    _untouched(target, "visitor")


# --- the token stays home ---------------------------------------------------------------------------------


class _Recorder:
    """A TCP listener that records every byte it is sent (optionally TLS with some certificate)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.tls = tls
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(5)
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                while data := conn.recv(65536):
                    self.received += data
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


def test_the_token_never_leaves_for_a_foreign_url(target: AgentProc, hosts: dict[str, Path]) -> None:
    token = target.token_file.read_text().strip().encode()
    plain = _Recorder()
    rogue_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rogue_ctx.load_cert_chain(hosts["rogue"] / "host-cert.pem", hosts["rogue"] / "host-key.pem")
    rogue = _Recorder(rogue_ctx)  # "alpha", by another CA
    try:
        r = target.request(
            "POST",
            "/v1/vms/resident/migrate",
            json={"to": f"http://127.0.0.1:{plain.port}", "mode": "offline"},
        )
        assert r.status_code == 422 and plain.connections == 0  # not even a connection
        for recorder in (plain, rogue):
            body = {"to": f"https://127.0.0.1:{recorder.port}", "mode": "offline"}
            r = target.request("POST", "/v1/vms/resident/migrate", json=body, timeout=60)
            assert r.status_code == 424, r.text
            assert "did not prove to be a host of this cluster" in r.json()["detail"]
        assert plain.connections == 1 and plain.received.startswith(b"\x16\x03")  # a TLS hello, nothing more
        assert rogue.connections == 1 and rogue.received == b""  # its certificate was refused
        for recorder in (plain, rogue):
            assert token not in recorder.received and b"Bearer" not in recorder.received
        assert json.loads(json.dumps(target.json("vm", "show", "resident", "--json")))["state"] == "stopped"
    finally:
        plain.close()
        rogue.close()
