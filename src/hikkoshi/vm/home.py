"""A VM's home directory: where its spec, disks, logs and run state live, and its run lock.

``<datastore>/<name>/`` holds ``vm.toml`` (the spec), ``<disk>.raw`` for every disk,
``console.log`` (the serial console of the current or last boot; the one before is
``console.log.1``), ``qemu.log``, ``nbd.log``, ``supervisor.log``, ``supervisor.pid``,
``state.json`` (what the supervisor last said about the VM), ``.lock``, and for a VM whose disks are not
all plain files (a relocation under way, a disk held by another host), ``disks.json`` (its :mod:`disk plan
<hikkoshi.vm.disk_serving>`).

The lock is the one truth about whether the VM runs: the supervisor holds an exclusive ``flock``
on ``.lock`` for as long as it owns the VM's processes, and the kernel drops it when the supervisor
ends however it ends. A pid file alone could name a recycled pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hikkoshi.vm.disk_serving import PLAN_FILE, DiskPlan
from hikkoshi.vm.errors import VmStartError
from hikkoshi.vm.spec import DiskSpec, VmSpec, load_spec

SPEC_FILE = "vm.toml"


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash only once the directory is synced
    finally:
        os.close(dir_fd)


class VmHome:
    """Paths and small files of one VM's home directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"VmHome({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The VM's name (the directory's name)."""
        return self.path.name

    @property
    def spec_file(self) -> Path:
        """``vm.toml``."""
        return self.path / SPEC_FILE

    @property
    def console_log(self) -> Path:
        """The serial console of the current (or last) boot."""
        return self.path / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own messages."""
        return self.path / "qemu.log"

    @property
    def nbd_log(self) -> Path:
        """The NBD service's messages."""
        return self.path / "nbd.log"

    @property
    def supervisor_log(self) -> Path:
        """The supervisor's log."""
        return self.path / "supervisor.log"

    @property
    def pid_file(self) -> Path:
        """The running supervisor's pid."""
        return self.path / "supervisor.pid"

    @property
    def state_file(self) -> Path:
        """What the supervisor last reported."""
        return self.path / "state.json"

    @property
    def lock_file(self) -> Path:
        """Locked by the supervisor while it runs."""
        return self.path / ".lock"

    def disk_path(self, disk: DiskSpec) -> Path:
        """The raw file of ``disk``."""
        return self.path / disk.file_name

    def boot_path(self, path: Path) -> Path:
        """A spec's boot file: relative paths are inside the home."""
        return path if path.is_absolute() else self.path / path

    def add_file(self, source: Path, name: str) -> Path:
        """Put a copy of ``source`` into the home as ``name`` (a hard link when possible).

        Files a VM boots from belong in its home: they travel with it, and nothing pruning a
        cache elsewhere can take them away. A hard link shares the bytes and stays valid if the
        source is later deleted (the cache replaces files, it never rewrites them in place).
        """
        target = self.path / name
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        return target

    def load_spec(self) -> VmSpec:
        """Read and validate ``vm.toml``."""
        return load_spec(self.spec_file)

    # --- how the disks are served ----------------------------------------------------------------------

    @property
    def disk_plan_file(self) -> Path:
        """``disks.json``: how each disk is served on this host, if not all are plain files."""
        return self.path / PLAN_FILE

    def load_disk_plan(self) -> DiskPlan:
        """The disk plan; every disk a plain file if there is none. A damaged plan is a clear error."""
        try:
            data = self.disk_plan_file.read_bytes()
        except FileNotFoundError:
            return DiskPlan()
        except OSError as exc:
            raise VmStartError(f"disk plan {self.disk_plan_file}: {exc.strerror}") from None
        try:
            return DiskPlan.model_validate_json(data)
        except ValidationError as exc:
            raise VmStartError(f"disk plan {self.disk_plan_file} is not valid: {exc}") from None

    def forget_listeners(self, migration: str) -> None:
        """Drop from the disk plan the listeners opened for ``migration`` (its disk service gone: they
        must not open again when the VM starts)."""
        if not self.disk_plan_file.exists():
            return
        plan = self.load_disk_plan()
        kept = tuple(x for x in plan.listeners if x.migration != migration)
        if kept != plan.listeners:
            self.save_disk_plan(plan.with_listeners(kept))

    def save_disk_plan(self, plan: DiskPlan) -> None:
        """Write the plan atomically; a plan of plain files without start facts is no plan at all."""
        if plan.all_files and not plan.geometry and plan.migration is None and not plan.listeners:
            self.disk_plan_file.unlink(missing_ok=True)
            return
        write_atomically(self.disk_plan_file, plan.model_dump_json(indent=2).encode(), mode=0o600)

    # --- run lock ----------------------------------------------------------------------------------------

    def try_lock(self) -> int | None:
        """Take the run lock; return its file descriptor, or ``None`` if someone holds it."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold the run lock for a while (e.g. to delete the VM); yields whether it was free."""
        fd = self.try_lock()
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def is_running(self) -> bool:
        """Whether a supervisor holds the run lock right now."""
        if not self.lock_file.exists():
            return False
        fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # A shared probe: it fails only against the supervisor's exclusive lock.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def supervisor_pid(self) -> int | None:
        """The pid in ``supervisor.pid``, if the file is there and sane."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    # --- state -------------------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        """``state.json``, or an empty dict if there is none (never started) or it is unreadable."""
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def recorded_pids(self) -> list[int]:
        """Every process ``state.json`` names: supervisor, QEMU, NBD service, relocation proxies
        (whether or not they still run)."""
        state = self.read_state()
        pids = [int(state[k]) for k in ("supervisor_pid", "qemu_pid", "nbd_pid") if state.get(k)]
        pids += [int(p) for p in (state.get("proxy_pids") or {}).values()]
        return pids

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace ``state.json``."""
        write_atomically(self.state_file, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
