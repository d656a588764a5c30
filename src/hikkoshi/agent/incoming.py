"""The destination side of a migration from another host: what the ``/v1/incoming`` API does, as typed
operations (no QMP, control verb, path or address chosen by the caller).

A VM comes in through these steps, each asked by the source's agent: facts (precheck), the home with its
files, empty disks (precopy), the disk plan, the incoming supervisor, the stream (prepared and listened
for on this host's own migration address), the disks' relocations, the resume, and at the end either
``finish`` (the VM is this host's now) or ``remove`` (roll back). Only a VM that came in this way and was
not finished yet can be removed through this API: a peer never deletes a VM of this host. A VM whose
disks this host holds (it left with shared storage) may come home: its serving supervisor takes QEMU up
again, and a rollback only sends it back to serving.

Each VM coming in is remembered with its source agent and migration id, so that a VM left here by a
migration that ended elsewhere (its source rolled back while this agent was down) is cleaned up once the
source says so (:meth:`Incoming.sweep`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from typing import Any

from hikkoshi import __version__
from hikkoshi.agent.db import AgentDb
from hikkoshi.agent.errors import Conflict, NotFound
from hikkoshi.agent.host import Host
from hikkoshi.agent.models import IncomingFacts
from hikkoshi.agent.vm_rows import RowState
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.destination import LocalDestination
from hikkoshi.migrate.holders import release_holder_by_path
from hikkoshi.migrate.home_archive import ArchiveError, unpack_home
from hikkoshi.migrate.sides import SideError
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.disk_serving import DiskPlan, Holder
from hikkoshi.vm.host import host_facts, qemu_version, space

log = logging.getLogger("hikkoshi.agent.incoming")

INCOMING = RowState.INCOMING
SERVING = RowState.SERVING
RUNNING = RowState.RUNNING
STOPPED = RowState.STOPPED


class Incoming:
    """VMs migrating into this host, and VMs whose disks it holds for another host."""

    def __init__(self, host: Host, db: AgentDb) -> None:
        self.host = host
        self.db = db

    # --- rows ----------------------------------------------------------------------------------------------

    def _row(self, vm: str) -> dict[str, Any]:
        return self.db.vms().get(vm, {})

    @staticmethod
    def detail(row: dict[str, Any]) -> dict[str, Any]:
        """What a row remembers about the migration that brings the VM in."""
        try:
            value = json.loads(row.get("detail") or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def _target(self, vm: str, *states: str) -> LocalDestination:
        """The VM's destination here, if its row is in one of ``states``."""
        row = self._row(vm)
        if row.get("state") not in states:
            raise NotFound(f"no VM {vm!r} coming in to {self.host.config.name}")
        ds = row["datastore"]
        if ds not in self.host.stores:
            raise Conflict(f"VM {vm!r} was coming in to datastore {ds!r}, which is gone")
        return LocalDestination(
            vm,
            self.host.stores[ds].path,
            self.host.config.runtime_dir,
            address=self.host.config.migration_address,
            tls_dir=self.host.config.migration_tls_dir,
        )

    def _coming(self, vm: str) -> LocalDestination:
        return self._target(vm, INCOMING)

    # --- before the VM is here ----------------------------------------------------------------------------

    async def facts(self, vm: str, datastore: str | None) -> IncomingFacts:
        """What the precheck needs to know about this host (and whether it holds this VM's disks)."""
        name = datastore or next(iter(self.host.stores))
        store = self.host.stores.get(name)
        facts = await asyncio.to_thread(host_facts)
        row = self._row(vm)
        holds = row.get("state") == SERVING
        home_there = vm in self.host.homes() or (store is not None and (store.path / vm).exists())
        return IncomingFacts(
            datastore=row["datastore"] if holds else name,
            datastore_path=str(self.host.stores[row["datastore"]].path)
            if holds
            else str(store.path)
            if store
            else "",
            datastore_exists=store is not None or holds,
            home_exists=home_there,
            holds_vm=holds,
            uuid=row.get("uuid"),
            free_bytes=space(store.path).free if store else 0,
            accel=await self.host.accel(),
            qemu_version=list(await asyncio.to_thread(qemu_version, self.host.config.qemu)),
            hikkoshi_version=__version__,
            facts=facts.as_dict(),
            runtime_dir=str(self.host.config.runtime_dir),
            host=self.host.config.name,
        )

    async def create_home(
        self, vm: str, datastore: str | None, archive: bytes, source: str | None, migration: str | None
    ) -> int:
        """Make the VM's home and unpack its files; ``Conflict`` ("exists") if there is one."""
        ds, store = self.host.datastore(datastore)
        home = store.home(vm)
        if vm in self.host.homes() or home.path.exists():
            raise Conflict(f"{home.path} exists already: a VM of that name is here")
        home.path.mkdir(mode=0o700)
        self.db.set_vm(vm, ds, None, INCOMING, json.dumps({"source": source, "migration": migration}))
        try:
            return await asyncio.to_thread(unpack_home, archive, home.path)
        except (ArchiveError, OSError) as exc:
            shutil.rmtree(home.path, ignore_errors=True)
            self.db.forget_vm(vm)
            raise ValueError(f"home files of {vm!r}: {exc}") from None

    async def create_disks(self, vm: str, sizes: dict[str, int]) -> None:
        """Empty disks for a mirror to fill (never over a file that is there)."""
        target = self._coming(vm)
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
        target = self._coming(vm)
        self._check_disk_files(target, {name: size for name, (_uri, size) in disks.items()})
        try:
            return await target.pull_disks(disks)
        except SideError as exc:
            raise Conflict(str(exc)) from None

    async def save_plan(self, vm: str, plan: DiskPlan) -> None:
        """How each disk will be served."""
        target = self._coming(vm)
        spec = target.home.load_spec()
        unknown = set(plan.disks) - {d.name for d in spec.disks}
        if unknown:
            raise ValueError(f"the plan names disks VM {vm!r} does not have: {', '.join(sorted(unknown))}")
        await target.save_plan(plan)

    async def start(self, vm: str, accel: str, migration: str, source: str | None) -> dict[str, Any]:
        """Start the incoming supervisor (this host's QEMU binary), or let a serving one take the VM back."""
        if self.host.cluster is not None:
            self.host.cluster.need_online("accepts")  # cut off from etcd: no VM comes in
        row = self._row(vm)
        if row.get("state") == SERVING:
            target = self._target(vm, SERVING)
            result = await self._side(target.start_incoming(accel, None, migration))
            detail = {"source": source, "migration": migration, "takes_back": True}
            self.db.set_vm(vm, row["datastore"], row.get("uuid"), INCOMING, json.dumps(detail))
            return dict(result)
        target = self._coming(vm)
        if await target.is_running():
            raise Conflict(f"VM {vm!r} runs already")
        # Remembered with the VM: the sweep asks the source about this migration if it goes silent.
        detail = {
            **self.detail(row),
            "migration": migration,
            "source": source or self.detail(row).get("source"),
        }
        uuid = row.get("uuid")
        with contextlib.suppress(OSError, ValueError):
            uuid = str(target.home.load_spec().uuid)
        self.db.set_vm(vm, row["datastore"], uuid, INCOMING, json.dumps(detail))
        qemu = self.host.config.qemu
        return await target.start_incoming(accel, qemu if qemu != DEFAULT_QEMU else None, migration)

    # --- while it comes in --------------------------------------------------------------------------------

    @staticmethod
    async def _side(call: Any) -> Any:
        try:
            return await call
        except SideError as exc:
            raise Conflict(str(exc)) from None

    async def prepare_stream(self, vm: str, postcopy: bool, tls: bool) -> None:
        """QEMU's incoming side: capabilities, and TLS with this host's credentials."""
        await self._side(self._coming(vm).prepare_stream(postcopy=postcopy, tls=tls))

    async def listen_stream(self, vm: str) -> tuple[str, int]:
        """QEMU listens on this host's migration address."""
        result: tuple[str, int] = await self._side(self._coming(vm).listen_stream())
        return result

    async def wait_stream(self, vm: str, limit: float) -> dict[str, Any]:
        """The incoming migration once it ended (or after ``limit`` s)."""
        info: qm.MigrationInfo = await self._side(self._coming(vm).wait_incoming(limit))
        return {**info.raw, "timed_out": info.timed_out}

    async def listen_disks(self, vm: str) -> str:
        """Precopy: the disk service listens on this host's migration address for the mirror."""
        result: str = await self._side(self._coming(vm).listen_disks())
        return result

    async def relocation(self, vm: str, disk: str, action: str) -> dict[str, Any]:
        """Pause, resume or invalidate (the switchover) a disk's relocation."""
        target = self._target(vm, INCOMING, RUNNING)
        result: dict[str, Any] = await self._side(target.relocation(disk, action))
        return result

    async def disk_status(self, vm: str) -> dict[str, Any]:
        """How each disk is served now."""
        result: dict[str, Any] = await self._side(self._target(vm, INCOMING, RUNNING).disk_status())
        return result

    async def disk_stats(self, vm: str) -> dict[str, Any]:
        """The disk service's request statistics."""
        result: dict[str, Any] = await self._side(self._target(vm, INCOMING, RUNNING).disk_stats())
        return result

    async def set_patience(self, vm: str, seconds: float | None) -> None:
        """How long a disk request waits for a lost source."""
        await self._side(self._target(vm, INCOMING, RUNNING).set_patience(seconds))

    async def resume(self, vm: str, token: int | None = None) -> None:
        """The guest runs here; in a cluster only once the owner key names this host with ``token``."""
        target = self._coming(vm)
        if self.host.cluster is not None:
            await self.host.cluster.check_token(target.home.load_spec(), token)
        await self._side(target.resume(token))

    async def announce(self, vm: str) -> None:
        """The VM's NICs announce their MACs from here."""
        await self._side(self._target(vm, INCOMING, RUNNING).announce())

    async def status(self, vm: str) -> dict[str, Any]:
        """The incoming VM's supervisor status."""
        result: dict[str, Any] = await self._side(self._target(vm, INCOMING, RUNNING, SERVING).vm_status())
        return result

    async def running(self, vm: str) -> bool:
        """Whether the incoming VM's supervisor runs."""
        return await self._target(vm, INCOMING, RUNNING, SERVING).is_running()

    async def spec_toml(self, vm: str) -> str:
        """The incoming VM's ``vm.toml``."""
        return self._target(vm, INCOMING, RUNNING, SERVING).home.spec_file.read_text()

    # --- the end ------------------------------------------------------------------------------------------

    async def finish(self, vm: str) -> None:
        """The migration is done: the VM is this host's (no peer can remove it any more)."""
        row = self._row(vm)
        target = self._target(vm, INCOMING, RUNNING)
        await target.finish()
        spec = target.home.load_spec()
        self.db.set_vm(vm, row["datastore"], str(spec.uuid), RUNNING)

    async def stop_serving(self, vm: str) -> None:
        """A powered-off VM came home: the serving supervisor stops; the home is the VM's again."""
        row = self._row(vm)
        target = self._target(vm, SERVING, INCOMING)
        await self._side(target.stop_serving())
        self.db.set_vm(vm, row["datastore"], row.get("uuid"), STOPPED)

    async def remove(self, vm: str) -> None:
        """Roll back: the incoming VM goes, with its home (a VM that was coming home serves again)."""
        row = self._row(vm)
        if row.get("state") == SERVING:
            return  # rolled back before (a take-back whose abort was repeated)
        if not row and vm not in self.host.homes():
            return  # removed before (a repeated rollback, or this host settled the migration itself)
        target = self._coming(vm)
        if self.detail(row).get("takes_back"):
            await self._side(target.abort_take_back())
            self.db.set_vm(vm, row["datastore"], row.get("uuid"), SERVING)
            return
        await target.remove()
        self.db.forget_vm(vm)

    async def release_held(self, vm: str, migration: str) -> None:
        """The VM no longer needs its disks here (it moved them, or they were pulled in elsewhere)."""
        row = self._row(vm)
        if not row:
            return  # released before
        if row.get("state") != SERVING:
            raise Conflict(f"VM {vm!r} is {row.get('state')} here, not held for another host")
        target = self._target(vm, SERVING)
        try:
            await release_holder_by_path(
                Holder(host=self.host.config.name, home=str(target.home.path)), migration
            )
        except SideError as exc:
            raise Conflict(str(exc)) from None
        self.db.forget_vm(vm)
        log.info("released the disks of VM %s (migration %s)", vm, migration)
