"""The destination side of a migration from another host: what the ``/v1/incoming`` API does.

A VM comes in through these steps, each asked by the source's agent: facts (precheck), the home with
its files, empty disks (precopy), the disk plan, the incoming supervisor, control commands to it while
the migration runs, and at the end either ``adopt`` (the VM is this host's now) or ``remove`` (roll
back). Only a VM that came in this way and was not adopted yet can be removed through this API: a
peer never deletes a VM of this host.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from hikkoshi import __version__
from hikkoshi.agent.db import AgentDb
from hikkoshi.agent.errors import Conflict, NotFound
from hikkoshi.agent.host import Host
from hikkoshi.agent.models import IncomingControl, IncomingFacts
from hikkoshi.migrate.destination import LocalDestination
from hikkoshi.migrate.home_archive import ArchiveError, unpack_home
from hikkoshi.migrate.sides import SideError
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.disk_plan import IncomingPlan
from hikkoshi.vm.host import host_facts, qemu_version, space

_INCOMING = "incoming"
_ADOPTED = "adopted"


class Incoming:
    """VMs migrating into this host."""

    def __init__(self, host: Host, db: AgentDb) -> None:
        self.host = host
        self.db = db

    def _target(self, vm: str, *, adopted: bool = True) -> LocalDestination:
        """The incoming VM's destination: a VM coming in, or (``adopted``) one that came in."""
        row = self.db.vms().get(vm, {})
        state = row.get("state")
        if state != _INCOMING and not (adopted and state == _ADOPTED):
            raise NotFound(f"no VM {vm!r} coming in to {self.host.config.name}")
        ds = row["datastore"]
        if ds not in self.host.stores:
            raise Conflict(f"VM {vm!r} was coming in to datastore {ds!r}, which is gone")
        return LocalDestination(vm, self.host.stores[ds].path, self.host.config.runtime_dir)

    async def facts(self, vm: str, datastore: str | None) -> IncomingFacts:
        """What the precheck needs to know about this host."""
        name = datastore or next(iter(self.host.stores))
        store = self.host.stores.get(name)
        facts = await asyncio.to_thread(host_facts)
        return IncomingFacts(
            datastore=name,
            datastore_path=str(store.path) if store else "",
            datastore_exists=store is not None,
            home_exists=vm in self.host.homes() or (store is not None and (store.path / vm).exists()),
            free_bytes=space(store.path).free if store else 0,
            accel=await self.host.accel(),
            qemu_version=list(await asyncio.to_thread(qemu_version, self.host.config.qemu)),
            hikkoshi_version=__version__,
            facts=facts.as_dict(),
            runtime_dir=str(self.host.config.runtime_dir),
        )

    async def create_home(self, vm: str, datastore: str | None, archive: bytes) -> int:
        """Make the VM's home and unpack its files; ``Conflict`` ("exists") if there is one."""
        ds, store = self.host.datastore(datastore)
        home = store.home(vm)
        if vm in self.host.homes() or home.path.exists():
            raise Conflict(f"{home.path} exists already: a VM of that name is here")
        home.path.mkdir(mode=0o755)
        self.db.set_vm(vm, ds, None, _INCOMING)
        try:
            return await asyncio.to_thread(unpack_home, archive, home.path)
        except (ArchiveError, OSError) as exc:
            shutil.rmtree(home.path, ignore_errors=True)
            self.db.forget_vm(vm)
            raise ValueError(f"home files of {vm!r}: {exc}") from None

    async def create_disks(self, vm: str, sizes: dict[str, int]) -> None:
        """Empty disks for a mirror to fill (never over a file that is there)."""
        target = self._target(vm, adopted=False)
        self._check_disk_files(target, sizes)
        await target.create_disks(sizes)

    def _check_disk_files(self, target: LocalDestination, sizes: dict[str, int]) -> None:
        """Only the VM's own disk files, at their sizes, and none that is there already."""
        spec = target.home.load_spec()
        files = {d.file_name: d.size for d in spec.disks}
        for name, size in sizes.items():
            if files.get(name) != size:
                raise ValueError(f"{name!r} of {size} bytes is not a disk of VM {target.vm!r}")
            if (target.home.path / name).exists():
                raise Conflict(f"disk file {name!r} exists already")

    async def pull(self, vm: str, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        """Cold migration: copy the disks from the source's export (the request lasts as long)."""
        target = self._target(vm, adopted=False)
        self._check_disk_files(target, {name: size for name, (_uri, size) in disks.items()})
        try:
            return await target.pull_disks(disks)
        except SideError as exc:
            raise Conflict(str(exc)) from None

    async def save_plan(self, vm: str, plan: IncomingPlan) -> None:
        """Write the disk plan."""
        target = self._target(vm, adopted=False)
        spec = target.home.load_spec()
        unknown = set(plan.disks) - {d.name for d in spec.disks}
        if unknown:
            raise ValueError(f"the plan names disks VM {vm!r} does not have: {', '.join(sorted(unknown))}")
        await target.save_plan(plan)

    async def start(self, vm: str, accel: str) -> dict[str, Any]:
        """Start the incoming supervisor (this host's QEMU binary)."""
        target = self._target(vm, adopted=False)
        if await target.is_running():
            raise Conflict(f"VM {vm!r} runs already")
        qemu = self.host.config.qemu
        return await target.start_incoming(accel, qemu if qemu != DEFAULT_QEMU else None)

    async def running(self, vm: str) -> bool:
        """Whether the incoming VM's supervisor runs."""
        return await self._target(vm).is_running()

    async def spec_toml(self, vm: str) -> str:
        """The incoming VM's ``vm.toml``."""
        return self._target(vm).home.spec_file.read_text()

    async def control(self, vm: str, body: IncomingControl) -> Any:
        """A control command to the incoming VM's supervisor, NBD service or a proxy."""
        target = self._target(vm)
        try:
            if body.target == "supervisor":
                return await target.ctl(body.command, **body.args)
            if body.target == "nbd":
                return await target.nbd(body.command, **body.args)
            if body.disk is None:
                raise ValueError("a proxy command names its disk")
            return await target.proxy(body.disk, body.command, **body.args)
        except SideError as exc:
            raise Conflict(str(exc)) from None

    async def drop_plan(self, vm: str) -> None:
        """Every disk is local: no disk plan any more."""
        await self._target(vm).drop_plan()

    async def adopt(self, vm: str) -> None:
        """The migration is done: the VM is this host's (and no peer can remove it any more)."""
        target = self._target(vm)
        spec = target.home.load_spec()
        self.db.set_vm(vm, self.db.vms()[vm]["datastore"], str(spec.uuid), _ADOPTED)

    async def remove(self, vm: str) -> None:
        """Roll back: kill the incoming VM and delete its home."""
        target = self._target(vm, adopted=False)
        await target.remove()
        self.db.forget_vm(vm)
