"""Host agents for the endurance and fault benchmarks: each a real ``hikkoshi agent`` process (on
loopback, or inside a lab host's network namespace) that can be stopped with any signal and started
again on the same state directory and the same address, as an operator's service manager would; and a
small synchronous client of the agent's API. Each host has its certificate from a cluster CA made for
the run beside the shared token (``pki/``), as ``hikkoshi cluster init``/``issue`` make them: the API is
HTTPS and every migration stream between the hosts TLS, as on real hosts.

The agents' VMs outlive them (each has its own supervisor): whoever uses these cleans VMs up by pid
(:func:`bench.host_census.kill_vm_processes`).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hikkoshi.identity.authority import Issued, issue_host, make_ca

_LISTENING = re.compile(r"listening on (\S+)")
#: Migration phases after which nothing happens any more.
FINAL = frozenset({"done", "rolled-back", "failed"})


class ApiError(RuntimeError):
    """The agent refused a request (``status``), or did not answer (``status`` 0)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


def make_token(path: Path) -> None:
    """The cluster's shared token, made once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(24) + "\n")
        path.chmod(0o600)


class AgentApi:
    """Requests to one agent (JSON in and out; errors as :class:`ApiError`)."""

    def __init__(self, url: str, token: str, ca: Path, timeout: float = 120.0) -> None:
        self.url = url
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,
            verify=ssl.create_default_context(cafile=str(ca)),
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"{self.url} does not answer: {exc!r}") from None
        if response.status_code >= 400:
            try:
                detail = str(response.json().get("detail"))
            except ValueError:
                detail = response.text[:500]
            raise ApiError(response.status_code, detail)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        response = self.request("POST", path, json=body, **kwargs)
        return response.json() if response.content else None

    # --- VMs ----------------------------------------------------------------------------------------------

    def vms(self) -> dict[str, dict[str, Any]]:
        """The agent's VMs by name."""
        return {vm["name"]: vm for vm in self.get("/v1/vms")}

    def create_busy(self, name: str, params: dict[str, str], memory_mib: int, disk: str) -> None:
        """A VM of the test guest running the ``busy`` workload (disk writer + memory dirtier)."""
        body = {"name": name, "memory_mib": memory_mib, "disks": [disk], "guest": "busy", "params": params}
        self.post("/v1/vms", body, timeout=600)

    def start(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.post(f"/v1/vms/{name}/start", timeout=300)
        return result

    def stop(self, name: str, timeout: float = 120.0) -> dict[str, Any]:
        result: dict[str, Any] = self.post(f"/v1/vms/{name}/stop", {"timeout": timeout}, timeout=timeout + 60)
        return result

    def destroy(self, name: str) -> None:
        self.request("DELETE", f"/v1/vms/{name}")

    def console(self, name: str, offset: int = 0) -> str:
        """The VM's console from ``offset``."""
        response = self.request("GET", f"/v1/vms/{name}/console", params={"offset": offset})
        return response.content.decode(errors="replace")

    # --- migrations ---------------------------------------------------------------------------------------

    def migrate(self, name: str, to: str, *, storage: str = "hybrid", mode: str = "live") -> str:
        """Start a migration to the agent at ``to``; its id."""
        body = {"to": to, "storage": storage, "mode": mode}
        return str(self.post(f"/v1/vms/{name}/migrate", body)["id"])

    def storage_migrate(self, name: str, datastore: str) -> str:
        """Start moving the VM to another datastore of this host; its id."""
        return str(self.post(f"/v1/vms/{name}/storage-migrate", {"datastore": datastore})["id"])

    def migration(self, migration: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/v1/migrations/{migration}")
        return result

    def migrations(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/v1/migrations")
        return result

    def wait_final(self, migration: str, timeout: float) -> dict[str, Any]:
        """The migration once it ended (a final phase, its job no longer running); :class:`TimeoutError`
        with its last state if it does not within ``timeout`` s. An agent that does not answer for a
        while (restarting) is waited for too."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                info = self.migration(migration)
            except ApiError as exc:
                if exc.status:
                    raise
            else:
                if info["phase"] in FINAL and not info["running"]:
                    return info
            time.sleep(0.25)
        raise TimeoutError(f"migration {migration} did not end within {timeout:.0f} s: {info}")


@dataclass
class AgentHost:
    """One agent process (see the module's docstring)."""

    name: str
    logs: Path
    state_dir: Path
    datastores: dict[str, Path]
    token_file: Path
    address: str = "127.0.0.1"
    port: int = 0
    """0 the first time (a free port is picked); the agent comes back on the same one."""
    netns: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    """More arguments for ``hikkoshi agent`` (``--etcd URL``, ``--load-interval S``)."""
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    _api: AgentApi | None = None

    @property
    def log(self) -> Path:
        return self.logs / f"agent-{self.name}.log"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.poll() is not None else self.proc.pid

    @property
    def runtime_dir(self) -> Path:
        """Where the agent's VMs keep their sockets."""
        return self.state_dir / "run"

    def identity(self) -> Issued:
        """This host's certificate (made the first time, from the run's CA beside the token)."""
        pki = self.token_file.parent / "pki"
        if not (pki / "ca" / "ca-cert.pem").exists():
            make_ca(pki / "ca")
        out = pki / self.name
        if not (out / "host-cert.pem").exists():
            return issue_host(pki / "ca", self.name, out, [self.address])
        return Issued(out / "host-cert.pem", out / "host-key.pem", out / "ca-cert.pem")

    def command(self) -> list[str]:
        ids = self.identity()
        cmd = ["ip", "netns", "exec", self.netns] if self.netns else []
        cmd += [sys.executable, "-m", "hikkoshi", "-v", "agent", "--name", self.name]
        cmd += ["--listen", f"{self.address}:{self.port}"]
        cmd += ["--cert", str(ids.cert), "--key", str(ids.key), "--ca", str(ids.ca)]
        for ds, path in self.datastores.items():
            cmd += ["--datastore", f"{ds}={path}"]
        return [*cmd, "--state-dir", str(self.state_dir), "--token-file", str(self.token_file), *self.extra]

    def start(self, timeout: float = 120.0) -> None:
        """Start the agent and wait until it answers."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.pop("HIKKOSHI_RUNTIME_DIR", None)  # the agent's VMs live in its state dir
        with self.log.open("ab") as out:
            start = out.tell()
            out.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log.open("rb") as f:
                f.seek(start)
                found = _LISTENING.search(f.read().decode(errors="replace"))
            if found:
                self.url = found[1]
                self.port = int(self.url.rsplit(":", 1)[1])
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited at start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"agent {self.name} did not start within {timeout:.0f} s")
        while time.monotonic() < deadline:
            try:
                self.api.get("/v1/host")
                return
            except ApiError:
                time.sleep(0.1)
        raise RuntimeError(f"agent {self.name} does not answer at {self.url}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int | None:
        """Stop the agent (SIGTERM: it cancels its jobs first; SIGKILL: it just dies); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop with ``sig`` and start again on the same state dir and address; the exit status."""
        code = self.stop(sig)
        self.start()
        return code

    @property
    def api(self) -> AgentApi:
        if self._api is None or self._api.url != self.url:
            if self._api is not None:
                self._api.close()
            self._api = AgentApi(self.url, self.token_file.read_text().strip(), self.identity().ca)
        return self._api

    def usage(self) -> dict[str, int]:
        """The agent process's resident memory (KiB) and open file descriptors now."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"agent {self.name} is not running")
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}

    def open_files(self) -> list[str]:
        """What the agent's file descriptors are (``socket:[...]``, ``pipe:[...]``, paths), to tell a
        leak from a connection in passing."""
        pid = self.pid
        out = []
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        return out
