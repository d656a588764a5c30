"""When a migration finishes, the VM is the destination's own: its disk service serves its QEMU and
nobody else. A listener a migration opened on the network (precopy's mirror target; the export a holder
served the host the VM came back from) is closed, never left open to the migration network for good."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hikkoshi.migrate.destination import LocalDestination
from tests.support.disk_services import disk_service, verb, vm_home


def test_finish_closes_the_network_listeners_of_the_disk_service(tmp_path: Path) -> None:
    home = vm_home(tmp_path, 1 << 20)
    with (home.path / "disk0.raw").open("wb") as disk:
        disk.truncate(1 << 20)
    with disk_service(home, tmp_path / "run") as (_proc, _uri, control):
        home.write_state({"state": "running", "nbd_control": str(control)})
        verb(control, "listen", address="127.0.0.1:0")  # as precopy's listen_disks does
        assert any(not a.startswith("unix:") for a in verb(control, "listening"))
        asyncio.run(LocalDestination("vm", tmp_path).finish())
        assert all(a.startswith("unix:") for a in verb(control, "listening"))
