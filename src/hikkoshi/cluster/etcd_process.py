"""Local etcd members as supervised child processes: one member under a state dir, or a small cluster.

- :meth:`EtcdMember.single` is the embedded default for one machine (``hikkoshi cluster up``, the demo):
  one member, data under ``STATE_DIR/etcd``, clients on ``127.0.0.1:2379``, peers on ``:2380``, both
  on loopback only, history compacted hourly.
- :class:`LocalCluster` is several members on loopback ports (tests: members die, leaders change).

A member is started, waited for until it answers ``/health``, and stopped with SIGTERM, a wait, then
SIGKILL. Errors say what to do: no ``etcd`` binary (``apt-get install etcd-server``), a port already
taken, a member that exited (with the end of its log). Processes are plain ``subprocess.Popen``
children so that they can outlive one event loop (a test module shares one cluster between tests);
the waits are async.

TLS for clients (:class:`MemberTls`): the member serves ``https://`` with its certificate and accepts
only clients whose certificate the given CA signed; connect with
:class:`hikkoshi.cluster.config.EtcdTls`. Peers talk plain HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from hikkoshi.cluster.errors import EtcdNotInstalled, EtcdProcessError, PortInUse

INSTALL_HINT = "install it: apt-get install etcd-server"


@dataclass(frozen=True)
class MemberTls:
    """TLS for a member's clients (PEM files).

    ``cert_file``/``key_file``: the member's server certificate (its SAN names the listen address;
    its extended key usage must allow *client* auth too: etcd's HTTP gateway dials the member's own
    gRPC port with it);
    ``client_ca_file``: the CA clients' certificates must chain to; ``ca_file``: the CA of the server
    certificate; ``probe_cert_file``/``probe_key_file``: a client certificate for this supervisor's
    health probes.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path
    ca_file: Path
    probe_cert_file: Path
    probe_key_file: Path


@dataclass(frozen=True)
class MemberSpec:
    """Where one member lives and listens."""

    name: str
    data_dir: Path
    client_port: int = 2379
    peer_port: int = 2380
    host: str = "127.0.0.1"
    tls: MemberTls | None = None
    heartbeat_ms: int = 100
    election_ms: int = 1000
    compaction_retention: str | None = None
    """Keep this much history (etcd's ``--auto-compaction-retention``, periodic), e.g. ``"1h"``."""
    extra_args: tuple[str, ...] = ()

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` for :class:`hikkoshi.cluster.config.EtcdConfig`."""
        return f"{self.host}:{self.client_port}"


def etcd_binary() -> str:
    """The ``etcd`` executable, or :class:`EtcdNotInstalled`."""
    path = shutil.which("etcd")
    if path is None:
        raise EtcdNotInstalled(f"no etcd binary on this machine; {INSTALL_HINT}")
    return path


def check_port_free(host: str, port: int) -> None:
    """:class:`PortInUse` if something listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"{host}:{port} is already in use (another etcd?); choose other ports") from e
            raise EtcdProcessError(f"cannot listen on {host}:{port}: {e}") from e


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on now (the kernel's choice, so no guessing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdMember:
    """One etcd process. ``start`` then ``await wait_healthy()``; ``await stop()`` (or ``kill``)."""

    def __init__(
        self,
        spec: MemberSpec,
        *,
        initial_cluster: str | None = None,
        cluster_token: str = "hikkoshi",
    ) -> None:
        self.spec = spec
        self.initial_cluster = initial_cluster or f"{spec.name}={spec.peer_url}"
        self.cluster_token = cluster_token
        self.log_path = spec.data_dir.with_name(spec.data_dir.name + ".log")
        self._proc: subprocess.Popen[bytes] | None = None
        self.last_probe = "none yet"

    @classmethod
    def single(cls, state_dir: Path, *, client_port: int = 2379, peer_port: int = 2380) -> EtcdMember:
        """The embedded default: one member on loopback with its data in ``state_dir/etcd``."""
        spec = MemberSpec(
            name="hikkoshi",
            data_dir=state_dir / "etcd",
            client_port=client_port,
            peer_port=peer_port,
            compaction_retention="1h",
        )
        return cls(spec)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The etcd command line for this member."""
        s = self.spec
        cmd = [
            etcd_binary(),
            "--name", s.name,
            "--data-dir", str(s.data_dir),
            "--listen-client-urls", s.client_url,
            "--advertise-client-urls", s.client_url,
            "--listen-peer-urls", s.peer_url,
            "--initial-advertise-peer-urls", s.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", str(s.heartbeat_ms),
            "--election-timeout", str(s.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if s.compaction_retention:
            cmd += [
                "--auto-compaction-mode",
                "periodic",
                "--auto-compaction-retention",
                s.compaction_retention,
            ]
        if s.tls:
            cmd += [
                "--cert-file", str(s.tls.cert_file),
                "--key-file", str(s.tls.key_file),
                "--client-cert-auth",
                "--trusted-ca-file", str(s.tls.client_ca_file),
            ]  # fmt: skip
        return cmd + list(s.extra_args)

    def start(self) -> None:
        """Spawn the process (it is not ready yet: :meth:`wait_healthy`)."""
        if self.running:
            return
        cmd = self.command()
        check_port_free(self.spec.host, self.spec.client_port)
        check_port_free(self.spec.host, self.spec.peer_port)
        self.spec.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spec.data_dir.chmod(0o700)  # etcd insists
        # etcd also reads its flags from ETCD_* variables: none may leak in from our environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )

    def log_tail(self, lines: int = 15) -> str:
        """The end of the member's log (what it said before dying)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _died(self) -> EtcdProcessError:
        code = self._proc.returncode if self._proc else None
        tail = self.log_tail()
        if "address already in use" in tail:
            return PortInUse(f"etcd {self.spec.name}: a port is already in use (another etcd?):\n{tail}")
        return EtcdProcessError(f"etcd {self.spec.name} exited with status {code}:\n{tail}")

    def _http(self) -> httpx.AsyncClient:
        tls = self.spec.tls
        if tls is None:
            return httpx.AsyncClient(timeout=2.0, trust_env=False)
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        context.load_cert_chain(str(tls.probe_cert_file), str(tls.probe_key_file))
        return httpx.AsyncClient(timeout=2.0, trust_env=False, verify=context)

    async def healthy(self) -> bool:
        """Whether the member answers ``/health`` with true (it has a leader and serves reads)."""
        try:
            async with self._http() as http:
                r = await http.get(f"{self.spec.client_url}/health")
            self.last_probe = f"HTTP {r.status_code} {r.text.strip()[:200]}"
            return r.status_code == 200 and r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError, ssl.SSLError) as e:
            self.last_probe = f"{type(e).__name__}: {e}"
            return False

    async def wait_healthy(self, within: float = 30.0) -> None:
        """Until ``/health`` says true; :class:`EtcdProcessError` if it exits or ``within`` s pass."""
        end = time.monotonic() + within
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise self._died()
            if await self.healthy():
                return
            if time.monotonic() > end:
                raise EtcdProcessError(
                    f"etcd {self.spec.name} not healthy after {within:.0f} s"
                    f" (last probe: {self.last_probe}):\n{self.log_tail()}"
                )
            await asyncio.sleep(0.1)

    async def status(self) -> dict[str, object]:
        """The member's ``/v3/maintenance/status`` (its id, the leader's id, raft index)."""
        async with self._http() as http:
            r = await http.post(f"{self.spec.client_url}/v3/maintenance/status", json={})
            r.raise_for_status()
            body: dict[str, object] = r.json()
            return body

    async def stop(self, within: float = 10.0) -> None:
        """SIGTERM, wait up to ``within`` s, then SIGKILL; reaps the process."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, within)
        self.kill()

    def kill(self) -> None:
        """SIGKILL now (a crash, for tests; or the end of :meth:`stop`) and reap."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        self._proc = None

    def stop_sync(self, timeout: float = 10.0) -> None:
        """:meth:`stop` without an event loop (clean-up code)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_healthy()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


@dataclass
class LocalCluster:
    """Several members on loopback, each with its own ports and data dir under ``base_dir``."""

    members: list[EtcdMember] = field(default_factory=list)

    @classmethod
    def loopback(
        cls,
        base_dir: Path,
        size: int = 3,
        *,
        tls: MemberTls | None = None,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
    ) -> LocalCluster:
        """``size`` members on free loopback ports (short election timeouts: tests wait less)."""
        ports = free_ports(2 * size)
        specs = [
            MemberSpec(
                name=f"m{i}",
                data_dir=base_dir / f"m{i}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                tls=tls,
                heartbeat_ms=heartbeat_ms,
                election_ms=election_ms,
            )
            for i in range(size)
        ]
        initial = ",".join(f"{s.name}={s.peer_url}" for s in specs)
        token = f"hikkoshi-{os.getpid()}-{ports[0]}"
        return cls([EtcdMember(s, initial_cluster=initial, cluster_token=token) for s in specs])

    @property
    def endpoints(self) -> list[str]:
        return [m.spec.endpoint for m in self.members]

    @property
    def pids(self) -> list[int]:
        return [p for m in self.members if (p := m.pid) is not None]

    async def start(self, within: float = 30.0) -> None:
        """Start every member (together: they elect a leader only once a majority runs) and wait."""
        try:
            for m in self.members:
                m.start()
            await asyncio.gather(*(m.wait_healthy(within) for m in self.members))
        except BaseException:
            self.stop_sync()
            raise

    async def leader(self, among: Sequence[int] | None = None) -> int:
        """The index of the member that leads now (asking the running members)."""
        for i in among if among is not None else range(len(self.members)):
            m = self.members[i]
            if not m.running:
                continue
            with contextlib.suppress(httpx.HTTPError):
                st = await m.status()
                leader = str(st.get("leader"))
                for j, other in enumerate(self.members):
                    if other.running:
                        with contextlib.suppress(httpx.HTTPError):
                            header = (await other.status()).get("header")
                            if isinstance(header, dict) and str(header.get("member_id")) == leader:
                                return j
        raise EtcdProcessError("no running member knows a leader")

    async def restart(self, index: int, within: float = 30.0) -> None:
        """Start a stopped member again on its data (it rejoins)."""
        m = self.members[index]
        m.start()
        await m.wait_healthy(within)

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members))

    def stop_sync(self) -> None:
        for m in self.members:
            m.stop_sync()
