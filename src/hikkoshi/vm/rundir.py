"""The runtime directory of a running VM: its sockets (QMP, NBD, supervisor control).

Unix socket paths are limited to 107 bytes, and a VM's home can be anywhere (deep test
directories included), so sockets live in a short per-VM directory named after the VM's uuid:
``$HIKKOSHI_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/hikkoshi``, else ``/run/hikkoshi`` for root and
``/tmp/hikkoshi-<uid>`` for others. It exists only while the VM runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from hikkoshi.vm.errors import VmStartError

_SUN_PATH_MAX = 107


def runtime_root(env: Mapping[str, str] | None = None) -> Path:
    """Where the runtime directories of VMs go."""
    env = os.environ if env is None else env
    if env.get("HIKKOSHI_RUNTIME_DIR"):
        return Path(env["HIKKOSHI_RUNTIME_DIR"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "hikkoshi"
    if os.geteuid() == 0:
        return Path("/run/hikkoshi")
    return Path(f"/tmp/hikkoshi-{os.geteuid()}")


@dataclass(frozen=True)
class RunDir:
    """The runtime directory of one VM and the sockets in it."""

    path: Path

    @classmethod
    def for_vm(cls, uuid: UUID, root: Path | None = None) -> RunDir:
        """The runtime directory of the VM with this uuid."""
        return cls((root or runtime_root()) / str(uuid))

    @property
    def qmp_socket(self) -> Path:
        """QEMU connects here for QMP; the supervisor listens."""
        return self.path / "qmp.sock"

    @property
    def nbd_socket(self) -> Path:
        """The NBD service serves the VM's disks here."""
        return self.path / "nbd.sock"

    @property
    def nbd_control(self) -> Path:
        """The NBD service's control socket."""
        return self.path / "nbd-control.sock"

    def proxy_socket(self, disk: str) -> Path:
        """The relocation proxy of ``disk`` (an incoming VM's) serves it here."""
        return self.path / f"proxy-{disk}.sock"

    def proxy_control(self, disk: str) -> Path:
        """The control socket of ``disk``'s relocation proxy."""
        return self.path / f"proxy-{disk}-control.sock"

    @property
    def control_socket(self) -> Path:
        """The supervisor's control socket (``vm stop``, ``status`` and the like talk to it)."""
        return self.path / "supervisor.sock"

    def create(self) -> None:
        """Make a fresh, private directory (leftovers of a crashed run are removed)."""
        longest = max(len(str(p)) for p in (self.qmp_socket, self.nbd_control, self.control_socket))
        if longest > _SUN_PATH_MAX:
            raise VmStartError(
                f"runtime directory {self.path} is too deep for Unix sockets; set HIKKOSHI_RUNTIME_DIR"
            )
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.remove()
        self.path.mkdir(mode=0o700)

    def remove(self) -> None:
        """Remove the directory and its sockets."""
        shutil.rmtree(self.path, ignore_errors=True)
