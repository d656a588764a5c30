"""A VM's disk service as its supervisor starts it, for tests: a home with a one-disk spec, the service
as a real process, its control verbs."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hikkoshi.daemons.entry import disk_service_argv
from hikkoshi.nbd.control import control_request
from hikkoshi.vm.disk_serving import DiskPlan
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import parse_spec, spec_to_toml
from tests.support.servers import stop


def verb(path: Path, command: str, **args: Any) -> Any:
    """A control verb of the service at ``path``."""
    return asyncio.run(control_request(path, command, **args))


def vm_home(tmp: Path, size: int, plan: DiskPlan | None = None) -> VmHome:
    """A home of VM ``vm`` with one disk (``disk0``) of ``size`` bytes, served as ``plan`` says."""
    home = VmHome(tmp / "vm")
    home.path.mkdir()
    spec = parse_spec({"name": "vm", "memory_mib": 64, "disks": [{"name": "disk0", "size": str(size)}]})
    home.spec_file.write_text(spec_to_toml(spec))
    if plan is not None:
        home.save_disk_plan(plan)
    return home


@contextlib.contextmanager
def disk_service(home: VmHome, run: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """The VM's disk service as its supervisor starts it; (process, export URI, control socket)."""
    rundir = RunDir(run)
    rundir.path.mkdir(exist_ok=True)
    cmd = disk_service_argv(home, rundir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("hikkoshi: serving"), (line, proc.stderr.read() if proc.stderr else "")
        yield proc, f"nbd+unix:///disk0?socket={rundir.nbd_socket}", rundir.nbd_control
    finally:
        stop(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
