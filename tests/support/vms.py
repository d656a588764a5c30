"""Helpers for tests that run VMs: a short runtime directory, guest VMs, console waits, cleanup by pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.guest_image import GuestImage, build_guest
from hikkoshi.guest.guest_vm import create_guest_vm
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.procs import alive as alive

BOOT_TIMEOUT = 120.0


def need_qemu_tools() -> None:
    """Skip unless QEMU and the tools that build the guest are installed."""
    for tool in ("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The test guest, built (or found) in the default cache."""
    need_qemu_tools()
    return build_guest()


@pytest.fixture(autouse=True)
def short_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Sockets of test VMs go to a short private directory (pytest's tmp_path may be too long)."""
    path = Path(tempfile.mkdtemp(prefix="hk-", dir="/tmp"))
    monkeypatch.setenv("HIKKOSHI_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(tmp_path: Path) -> Datastore:
    """An empty datastore."""
    return Datastore.init(tmp_path / "ds")


def guest_vm(
    store: Datastore,
    guest: GuestImage,
    name: str,
    workload: str,
    params: Mapping[str, str | int] | None = None,
    **spec: Any,
) -> VmHome:
    """A VM booting the test guest into ``workload``; spec defaults: 256 MiB, one 16 MiB disk, no NIC."""
    data: dict[str, Any] = {
        "name": name,
        "memory_mib": 256,
        "disks": [{"name": "disk0", "size": "16M"}],
        "nics": [],
    }
    data.update(spec)
    return create_guest_vm(store, guest, data, workload, params)


def wait_dead(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait until none of ``pids`` lives; those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def console(home: VmHome) -> str:
    """The current boot's console output."""
    try:
        return home.console_log.read_text(errors="replace")
    except OSError:
        return ""


def wait_console(home: VmHome, pattern: str, timeout: float = BOOT_TIMEOUT, after: int = 0) -> re.Match[str]:
    """Wait until the console (from character ``after`` on) matches ``pattern``; fail with its tail."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        text = console(home)
        m = regex.search(text, after)
        if m:
            return m
        if not home.is_running():
            text = console(home)
            m = regex.search(text, after)
            if m:
                return m
            pytest.fail(f"VM {home.name} stopped before {pattern!r}; console:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern!r} on the console of {home.name} after {timeout} s:\n{text[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def running(home: VmHome, **start: Any) -> Iterator[dict[str, Any]]:
    """Start the VM; whatever happens, stop it and make sure its processes are gone afterwards."""
    info = control.start_vm(home, timeout=BOOT_TIMEOUT, **start)
    pids = [int(info[k]) for k in ("supervisor_pid", "qemu_pid", "nbd_pid") if info.get(k)]
    try:
        yield info
    finally:
        if home.is_running():
            with contextlib.suppress(Exception):
                asyncio.run(control.stop_vm(home, home.load_spec(), hard=True))
        if home.is_running():
            control.kill_vm(home)
        for pid in wait_dead(pids, 20.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert wait_dead(pids, 10.0) == []


def request(home: VmHome, command: str, **args: Any) -> Any:
    """A control command to the VM's supervisor."""
    return asyncio.run(control.request(home, home.load_spec(), command, **args))


def stop(home: VmHome, grace: float = 60.0, hard: bool = False) -> dict[str, Any]:
    """Stop the VM; the final state."""
    return asyncio.run(control.stop_vm(home, home.load_spec(), grace=grace, hard=hard))
