"""Helpers for tests that run host agents: start one as a real process (port 0), drive the CLI against
it, and clean up by pid: the agent, and every VM supervisor its datastores hold."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.vm.datastore import Datastore
from tests.support.vms import alive, wait_dead

_LISTENING = re.compile(r"listening on (\S+)")


@dataclass
class AgentProc:
    """One running agent."""

    name: str
    root: Path
    token_file: Path
    datastores: dict[str, Path]
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    url: str = ""

    state_root: Path | None = None
    ca_file: Path | None = None
    """The CA of the agent's TLS certificate (``--tls-cert`` in ``extra``)."""

    @property
    def state_dir(self) -> Path:
        # Short: VM sockets live below it (Unix socket paths are limited to 107 bytes).
        if self.state_root is None:
            self.state_root = Path(tempfile.mkdtemp(prefix="hka-", dir="/tmp"))
        return self.state_root

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start the agent and wait until it says where it listens."""
        cmd = [
            sys.executable,
            "-m",
            "hikkoshi",
            "-v",
            "agent",
            "--name",
            self.name,
            "--listen",
            "127.0.0.1:0",
        ]
        for ds, path in self.datastores.items():
            cmd += ["--datastore", f"{ds}={path}"]
        cmd += ["--state-dir", str(self.state_dir), "--token-file", str(self.token_file), *self.extra]
        env = {**os.environ, **self.env}
        env.pop("HIKKOSHI_RUNTIME_DIR", None)  # the agent's VMs live in its state dir
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = _LISTENING.search(line)
            if m:
                self.url = m[1]
                self._wait_serving(deadline)
                return
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"agent {self.name} did not start: {line!r}\n{self.log.read_text()[-3000:]}")

    def _wait_serving(self, deadline: float) -> None:
        import httpx

        token = self.token_file.read_text().strip()
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(
                    f"{self.url}/v1/host",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                    verify=ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True,
                )
                if r.status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"agent {self.name} does not answer at {self.url}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Stop the agent process (SIGTERM: it cancels its jobs; SIGKILL: it just dies)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def cli(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``hikkoshi --agent URL --token-file F ARGS``."""
        cmd = [sys.executable, "-m", "hikkoshi", "--agent", self.url, "--token-file", str(self.token_file)]
        cmd += ["--ca-file", str(self.ca_file)] if self.ca_file else []
        cmd += args
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert done.returncode == 0, (
                f"{args}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def json(self, *args: str, timeout: float = 600.0) -> Any:
        """A CLI command's JSON output."""
        return json.loads(self.cli(*args, timeout=timeout).stdout)

    def supervisor_pids(self) -> list[int]:
        """Pids of the VM supervisors (and their QEMU and NBD processes) in this agent's datastores."""
        pids: list[int] = []
        for path in self.datastores.values():
            if not path.exists():
                continue
            with contextlib.suppress(Exception):
                for entry in Datastore.open(path).entries():
                    pids += entry.home.recorded_pids()
        return [p for p in pids if alive(p)]

    def kill_vms(self) -> None:
        """Kill every VM of this agent's datastores."""
        for path in self.datastores.values():
            if not path.exists():
                continue
            with contextlib.suppress(Exception):
                for entry in Datastore.open(path).entries():
                    if entry.home.is_running():
                        with contextlib.suppress(Exception):
                            control.kill_vm(entry.home)


@contextlib.contextmanager
def agents(
    tmp: Path, *names: str, datastores: tuple[str, ...] = ("main",), extra: Sequence[str] = ()
) -> Iterator[list[AgentProc]]:
    """Started agents sharing one token, each with these datastores (the first is the default) and
    ``extra`` options (``--etcd URL``: members of a cluster); stopped and their VMs killed (by pid)
    afterwards, whatever happens."""
    token = tmp / "token"
    procs = [AgentProc(n, tmp / n, token, {d: tmp / n / d for d in datastores}, list(extra)) for n in names]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        pids = [pid for p in procs for pid in p.supervisor_pids()]
        for p in procs:
            p.stop()
            p.kill_vms()
        for pid in wait_dead(pids, 20.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            if p.state_root is not None:
                shutil.rmtree(p.state_root, ignore_errors=True)
        assert wait_dead(pids, 10.0) == []
