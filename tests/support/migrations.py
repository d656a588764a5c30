"""Two "hosts" on this machine for migration tests: datastores, a second runtime directory, and cleanup
of a VM's processes by pid whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.diskwriter import verify_diskwriter_image
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome
from tests.support.vms import console, stop, wait_dead

#: The diskwriter's last word when it stops: its run, the last record it wrote.
DONE = re.compile(r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(\d+) written=\d+ records=\d+ OK")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Datastore, Datastore, Path]]:
    """Host A's datastore, host B's datastore and B's runtime directory (A's is the test default)."""
    runtime_b = Path(tempfile.mkdtemp(prefix="hkb-", dir="/tmp"))
    yield Datastore.init(tmp_path / "a"), Datastore.init(tmp_path / "b"), runtime_b
    shutil.rmtree(runtime_b, ignore_errors=True)


@contextlib.contextmanager
def cleanup(home: VmHome) -> Iterator[None]:
    """Whatever happens, the VM at ``home`` (if it ever ran) is stopped and its processes are gone."""
    try:
        yield
    finally:
        pids = home.recorded_pids()
        if home.path.exists() and home.is_running():
            control.kill_vm(home)
        for pid in wait_dead(pids, 20.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert wait_dead(pids, 10.0) == []


def migrate(
    a: Datastore, b: Datastore, runtime_b: Path, name: str, *extra: str, crash_at: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Run `hikkoshi migrate --json`; its exit status and the record it printed (none if it was
    made to crash at ``crash_at``)."""
    cmd = [sys.executable, "-m", "hikkoshi", "migrate", name, "--datastore", str(a.path)]
    cmd += ["--to-datastore", str(b.path), "--to-runtime-dir", str(runtime_b), "--json", *extra]
    env = dict(os.environ)
    if crash_at is not None:
        env["HIKKOSHI_CRASH_AT"] = crash_at
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if crash_at is not None:
        assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
        return done.returncode, {}
    try:
        record = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"no JSON record (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, record


def finish_and_verify(home: VmHome, run: int, after: int = 0) -> int:
    """Stop the guest with the power button; its own final check must pass; the image verifies too."""
    state = stop(home)
    assert state["exit"]["how"] == "acpi", state
    text = console(home)
    done = DONE.search(text, after)
    assert done is not None, text[-3000:]
    last = int(done[2])
    assert verify_diskwriter_image(home.path / "disk0.raw", run=run, durable=last).last == last
    return last


def asyncio_request(home: VmHome, command: str, **args: Any) -> Any:
    import asyncio

    return asyncio.run(control.request(home, home.load_spec(), command, **args))
