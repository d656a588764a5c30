"""The destination of a live migration as the coordinator sees it: a datastore on some host, where the
VM's home is made, its incoming supervisor started and driven, and everything removed on rollback.

:class:`LocalDestination` is a datastore this process reaches by path (two "hosts" on one machine, or
the same host). A destination behind another host's agent implements the same class in the agent
layer, over that agent's API; the coordinator does not know the difference.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hikkoshi import __version__
from hikkoshi.migrate.disk_pull import pull_disk
from hikkoshi.migrate.home_files import copy_home_files
from hikkoshi.migrate.precheck import Side
from hikkoshi.migrate.sides import ControlSide, SideError, VmSide
from hikkoshi.vm import control
from hikkoshi.vm.disk_plan import PLAN_FILE, IncomingPlan
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, qemu_version, space
from hikkoshi.vm.spec import VmSpec


@dataclass(frozen=True)
class DestinationFacts:
    """What the destination says before anything moves."""

    side: Side
    datastore_exists: bool
    home_exists: bool


class Destination(ControlSide):
    """Where a migration goes (see the module's docstring)."""

    label = "destination"
    datastore: Path
    """The destination datastore, in the destination host's terms (for the record)."""
    runtime_dir: Path | None = None
    agent: str | None = None
    """The URL of the destination host's agent, if it is reached through one (for the record)."""

    @property
    def home_path(self) -> Path:
        """The VM's home there."""
        return self.datastore / self.vm

    def __init__(self, vm: str) -> None:
        self.vm = vm

    @abc.abstractmethod
    async def describe(self, accel: str, qemu: str) -> DestinationFacts:
        """The destination's facts for the precheck; ``accel`` and ``qemu`` are the source's (a local
        destination gets the same; a remote one says what it has)."""

    @abc.abstractmethod
    async def create_home(self, source_home: Path, disk_files: set[str]) -> int:
        """Make the home and copy the source's files but the disks into it (seed 000); bytes copied.
        ``FileExistsError`` if the home exists."""

    @abc.abstractmethod
    async def create_disks(self, sizes: dict[str, int]) -> None:
        """Empty (sparse) disk files of these sizes, by file name, for a mirror to fill."""

    @abc.abstractmethod
    async def save_plan(self, plan: IncomingPlan) -> None:
        """Write the disk plan (``incoming.json``) into the home."""

    @abc.abstractmethod
    async def pull_disks(self, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        """Cold migration: copy each disk (file name to export URI and size) completely from the
        source's read-only export into the home, flushed; what each copy fetched."""

    @abc.abstractmethod
    async def start_incoming(self, accel: str, qemu: str | None) -> dict[str, Any]:
        """Start the VM's supervisor in incoming mode; what it reported (pids, sockets)."""

    @abc.abstractmethod
    async def is_running(self) -> bool:
        """Whether the VM's supervisor runs there."""

    @abc.abstractmethod
    async def home_exists(self) -> bool:
        """Whether the VM's home exists there."""

    @abc.abstractmethod
    async def load_spec(self) -> VmSpec:
        """The VM's spec from the destination's home."""

    @abc.abstractmethod
    async def drop_plan(self) -> None:
        """Every disk is a complete local file: the home needs no disk plan any more."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Rollback: kill the VM there if it runs and delete its home."""

    async def adopt(self) -> None:
        """The migration is done: the VM belongs to the destination (which may then refuse
        :meth:`remove`). Nothing to do for a local datastore."""


class LocalDestination(Destination):
    """A datastore this process reaches by path."""

    def __init__(self, vm: str, datastore: Path, runtime_dir: Path | None = None) -> None:
        super().__init__(vm)
        self.datastore = datastore
        self.runtime_dir = runtime_dir
        self.home = VmHome(datastore / vm)
        self._side: VmSide | None = None

    def _vm(self) -> VmSide:
        if self._side is None:
            try:
                spec = self.home.load_spec()
            except (OSError, ValueError) as exc:
                raise SideError(f"destination: no VM in {self.home.path}: {exc}") from None
            self._side = VmSide(self.home, spec, self.label)
        return self._side

    async def ctl(self, command: str, **args: Any) -> Any:
        return await self._vm().ctl(command, **args)

    async def nbd(self, command: str, **args: Any) -> Any:
        return await self._vm().nbd(command, **args)

    async def proxy(self, disk: str, command: str, **args: Any) -> Any:
        return await self._vm().proxy(disk, command, **args)

    async def describe(self, accel: str, qemu: str) -> DestinationFacts:
        facts = await asyncio.to_thread(host_facts)
        version = await asyncio.to_thread(qemu_version, qemu)
        exists = self.datastore.is_dir()
        free = space(self.datastore).free if exists else 0
        return DestinationFacts(
            Side(facts, accel, version, __version__, free), exists, self.home.path.exists()
        )

    async def create_home(self, source_home: Path, disk_files: set[str]) -> int:
        self.home.path.mkdir(mode=0o755)
        return await asyncio.to_thread(copy_home_files, source_home, self.home.path, disk_files)

    async def create_disks(self, sizes: dict[str, int]) -> None:
        for name, size in sizes.items():
            with (self.home.path / name).open("wb") as f:
                f.truncate(size)

    async def save_plan(self, plan: IncomingPlan) -> None:
        self.home.save_plan(plan)

    async def pull_disks(self, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}

        async def pull(name: str, uri: str, size: int) -> None:
            status = await pull_disk(uri, self.home.path / name, size, log=self.home.nbd_log)
            keys = ("fetched_background_bytes", "fetched_demand_bytes", "zero_bytes", "size")
            results[name] = {k: status.get(k) for k in keys}

        async with asyncio.TaskGroup() as tg:
            for name, (uri, size) in disks.items():
                tg.create_task(pull(name, uri, size))
        await asyncio.to_thread(fsync_dir, self.home.path)
        return results

    async def start_incoming(self, accel: str, qemu: str | None) -> dict[str, Any]:
        return await asyncio.to_thread(
            control.start_vm,
            self.home,
            accel=accel,
            qemu=qemu,
            incoming=True,
            runtime_dir=self.runtime_dir,
        )

    async def is_running(self) -> bool:
        return self.home.path.exists() and self.home.is_running()

    async def home_exists(self) -> bool:
        return self.home.path.exists()

    async def load_spec(self) -> VmSpec:
        return self.home.load_spec()

    async def drop_plan(self) -> None:
        (self.home.path / PLAN_FILE).unlink(missing_ok=True)

    async def remove(self) -> None:
        if self.home.path.exists() and self.home.is_running():
            await asyncio.to_thread(control.kill_vm, self.home)
        if self.home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.home.path)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
