"""Two "hosts" on this machine for migration tests: datastores, a second runtime directory, and cleanup
of a VM's processes by pid whatever happens."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome
from tests.support.vms import wait_dead


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
