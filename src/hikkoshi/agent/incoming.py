"""The destination side of a migration from another host: what the ``/v1/incoming`` API does, as typed
operations (no QMP, control verb, path or address chosen by the caller).

A VM comes in through these steps, each asked by the source's agent: facts (precheck), the home with its
files, empty disks (precopy), the disk plan, the incoming supervisor, the stream (prepared and listened
for on this host's own migration address), the disks' relocations, the resume, and at the end either
``finish`` (the VM is this host's) or ``remove`` (roll back). Only a VM that came in this way and was not
finished yet can be removed through this API: a peer never deletes a VM of this host. A VM whose disks
this host holds (it left with shared storage) may come home: its serving supervisor takes QEMU up again,
and a rollback only sends it back to serving.

Every operation is bound to the peer that asks, known by its certificate (``peer``): a VM coming in
belongs to the host that sent its home, and only that host drives it (another host of the cluster is
told there is no such VM); the disks held here for a VM running elsewhere answer the host it runs on
only. A spec from a peer is checked like one from a user (:mod:`hikkoshi.vm.host_policy`), and the disks
a peer's migration listens for are opened to that peer's certificate alone, for that migration.

Each VM coming in is remembered with its source (host name, agent URL) and migration id, so that a VM
left here by a migration that ended elsewhere (its source rolled back while this agent was down) is
cleaned up once the source says so (:meth:`hikkoshi.agent.jobs.Jobs.maintain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from typing import Any

from hikkoshi import __version__
from hikkoshi.agent.db import AgentDb
from hikkoshi.agent.errors import Conflict, NotFound
from hikkoshi.agent.host import Host
from hikkoshi.agent.models import IncomingFacts
from hikkoshi.agent.vm_rows import RowState
from hikkoshi.identity.names import is_loopback
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.destination import LocalDestination
from hikkoshi.migrate.holders import release_holder_by_path
from hikkoshi.migrate.home_archive import ArchiveError, unpack_home
from hikkoshi.migrate.sides import SideError
from hikkoshi.nbd.uri import NbdUri
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.disk_serving import DiskPlan, Holder, Serving
from hikkoshi.vm.errors import VmError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, qemu_version, space

log = logging.getLogger("hikkoshi.agent.incoming")

INCOMING = RowState.INCOMING
SERVING = RowState.SERVING
RUNNING = RowState.RUNNING
STOPPED = RowState.STOPPED

__all__ = ["INCOMING", "RUNNING", "SERVING", "STOPPED", "Incoming"]


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
        """What a row remembers about the migration that brings the VM in (or the host it is held for)."""
        try:
            value = json.loads(row.get("detail") or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @classmethod
    def peer_of(cls, row: dict[str, Any]) -> str | None:
        """The host a row answers: the source of a VM coming in (or that came in), the host a VM whose
        disks are held here runs on."""
        detail = cls.detail(row)
        peer = detail.get("holding_for") if row.get("state") == SERVING else detail.get("source_host")
        return peer if isinstance(peer, str) else None

    def _destination(self, vm: str, ds: str) -> LocalDestination:
        config = self.host.config
        return LocalDestination(
            vm,
            self.host.stores[ds].path,
            config.runtime_dir,
            address=config.migration_address,
            tls_dir=config.tls_dir,
            tls_name=config.name,
        )

    def _target(self, vm: str, peer: str, *states: str) -> LocalDestination:
        """The VM's destination here, if its row is in one of ``states`` and answers ``peer``."""
        row = self._row(vm)
        if row.get("state") not in states or self.peer_of(row) != peer:
            # Another host of the cluster learns nothing about it, not even that it exists.
            raise NotFound(f"no VM {vm!r} coming in to {self.host.config.name} from {peer}")
        ds = row["datastore"]
        if ds not in self.host.stores:
            raise Conflict(f"VM {vm!r} was coming in to datastore {ds!r}, which is gone")
        return self._destination(vm, ds)

    def _coming(self, vm: str, peer: str) -> LocalDestination:
        return self._target(vm, peer, INCOMING)

    def _arrived(self, vm: str, peer: str) -> LocalDestination:
        """Coming in from ``peer``, or came in from it: the steps after the resume (relocations, disk
        figures, announce) are repeated by a source that takes its job over after this host finished
        it (a cluster's destination settles a migration whose source was down)."""
        return self._target(vm, peer, INCOMING, RUNNING)

    def _migration(self, vm: str) -> str | None:
        value = self.detail(self._row(vm)).get("migration")
        return value if isinstance(value, str) else None

    # --- before the VM is here ----------------------------------------------------------------------------

    async def facts(self, vm: str, datastore: str | None, peer: str) -> IncomingFacts:
        """What the precheck needs to know about this host (and whether it holds this VM's disks for
        ``peer``, the host the VM runs on)."""
        name = datastore or next(iter(self.host.stores))
        store = self.host.stores.get(name)
        facts = await asyncio.to_thread(host_facts)
        row = self._row(vm)
        holds = row.get("state") == SERVING and self.peer_of(row) == peer
        home_there = vm in self.host.homes() or (store is not None and (store.path / vm).exists())
        return IncomingFacts(
            datastore=row["datastore"] if holds else name,
            datastore_path=str(self.host.stores[row["datastore"]].path)
            if holds
            else str(store.path)
            if store
            else "",
            datastore_exists=store is not None or holds,
            home_exists=home_there or bool(row),
            holds_vm=holds,
            uuid=row.get("uuid") if holds else None,
            free_bytes=space(store.path).free if store else 0,
            accel=await self.host.accel(),
            qemu_version=list(await asyncio.to_thread(qemu_version, self.host.config.qemu)),
            hikkoshi_version=__version__,
            facts=facts.as_dict(),
            runtime_dir=str(self.host.config.runtime_dir),
            host=self.host.config.name,
        )

    async def create_home(
        self, vm: str, datastore: str | None, archive: bytes, source: str | None, peer: str
    ) -> int:
        """Make the VM's home and unpack its files; ``Conflict`` ("exists") if there is one. The spec
        that came with them is checked as a user's would be; the home goes again if it is refused."""
        ds, store = self.host.datastore(datastore)
        home = store.home(vm)
        if vm in self.host.homes() or home.path.exists() or self._row(vm):
            raise Conflict(f"{home.path} exists already: a VM of that name is here")
        home.path.mkdir(mode=0o700)
        home.path.chmod(0o700)  # the VM's alone, whatever the umask
        detail = {"source": source, "source_host": peer, "migration": None}
        self.db.set_vm(vm, ds, None, INCOMING, json.dumps(detail))
        try:
            written = await asyncio.to_thread(unpack_home, archive, home.path)
            self._check_spec(vm, home)
        except (ArchiveError, OSError, VmError, ValueError) as exc:
            shutil.rmtree(home.path, ignore_errors=True)
            self.db.forget_vm(vm)
            raise ValueError(f"home files of {vm!r}: {exc}") from None
        return written

    def _check_spec(self, vm: str, home: VmHome) -> None:
        """The spec a peer sent: this VM's, and nothing this host does not allow."""
        spec = home.load_spec()
        if spec.name != vm:
            raise ValueError(f"the spec names VM {spec.name!r}, not {vm!r}")
        problems = self.host.config.policy.spec_problems(spec, home.path)
        if problems:
            raise ValueError("; ".join(problems))

    async def create_disks(self, vm: str, sizes: dict[str, int], peer: str) -> None:
        """Empty disks for a mirror to fill (never over a file that is there)."""
        target = self._coming(vm, peer)
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

    async def pull(self, vm: str, disks: dict[str, tuple[str, int]], peer: str) -> dict[str, dict[str, Any]]:
        """Cold migration: copy the disks from the source's export (the request lasts as long)."""
        target = self._coming(vm, peer)
        self._check_disk_files(target, {name: size for name, (_uri, size) in disks.items()})
        for name, (uri, _size) in disks.items():
            self._check_source(uri, peer, name)
        try:
            result = await target.pull_disks(disks)
        except SideError as exc:
            raise Conflict(str(exc)) from None
        for name in disks:
            os.chmod(target.home.path / name, 0o600)  # however they arrived: the VM's only
        return result

    async def save_plan(self, vm: str, plan: DiskPlan, peer: str) -> None:
        """How each disk will be served: only by this host's own means (no listener, nothing of another
        migration), disks of this VM only."""
        target = self._coming(vm, peer)
        spec = target.home.load_spec()
        unknown = set(plan.disks) - {d.name for d in spec.disks}
        if unknown:
            raise ValueError(f"the plan names disks VM {vm!r} does not have: {', '.join(sorted(unknown))}")
        if plan.listeners:
            raise ValueError("a plan from another host opens no listener here")
        for name, serving in plan.disks.items():
            if serving.kind == Serving.FILE:
                continue
            assert serving.upstream is not None
            self._check_source(serving.upstream, peer, f"disk {name}")
            holder = serving.holder
            if holder is not None and (
                holder.host != peer or holder.home is not None or holder.agent is None
            ):
                # A holder is released through its own agent, never by a path on this host.
                raise ValueError(f"disk {name}: its holder must be {peer}, reached through its agent")
        await target.save_plan(plan)

    def _check_source(self, uri: str, peer: str, what: str) -> None:
        """A disk is read from the host that asks, and only from it: over TLS, its certificate naming
        ``peer`` (plain TCP only on a host that runs without TLS, on loopback)."""
        try:
            parsed = NbdUri.parse(uri)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if parsed.socket is not None:
            raise ValueError(f"{what}: another host's disk is not on a Unix socket here")
        if parsed.tls and parsed.tls_hostname == peer:
            return
        if not parsed.tls and self.host.config.insecure_loopback and is_loopback(parsed.host):
            return
        raise ValueError(
            f"{what}: its source must be {peer}'s export over TLS (nbds://...?tls-hostname={peer})"
        )

    async def start(
        self, vm: str, accel: str, migration: str, source: str | None, peer: str
    ) -> dict[str, Any]:
        """Start the incoming supervisor (this host's QEMU binary), or let a serving one take the VM back."""
        if self.host.cluster is not None:
            self.host.cluster.need_online("accepts")  # cut off from etcd: no VM comes in
        row = self._row(vm)
        if row.get("state") == SERVING:
            target = self._target(vm, peer, SERVING)
            result = await self._side(target.start_incoming(accel, None, migration))
            detail = {"source": source, "source_host": peer, "migration": migration, "takes_back": True}
            self.db.set_vm(vm, row["datastore"], row.get("uuid"), INCOMING, json.dumps(detail))
            return dict(result)
        target = self._coming(vm, peer)
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

    async def prepare_stream(self, vm: str, postcopy: bool, tls: bool, peer: str) -> None:
        """QEMU's incoming side: capabilities, and TLS with this host's certificate, accepting the stream
        from ``peer``'s certificate only."""
        self._require_tls(tls, "the memory stream")
        await self._side(self._coming(vm, peer).prepare_stream(postcopy=postcopy, tls=tls, peer=peer))

    def _require_tls(self, tls: bool, what: str) -> None:
        if not tls and self.host.config.encrypt:
            raise Conflict(f"{self.host.config.name} takes {what} over TLS only")

    async def listen_stream(self, vm: str, peer: str) -> tuple[str, int]:
        """QEMU listens on this host's migration address."""
        result: tuple[str, int] = await self._side(self._coming(vm, peer).listen_stream())
        return result

    async def wait_stream(self, vm: str, limit: float, peer: str) -> dict[str, Any]:
        """The incoming migration once it ended (or after ``limit`` s)."""
        info: qm.MigrationInfo = await self._side(self._coming(vm, peer).wait_incoming(limit))
        return {**info.raw, "timed_out": info.timed_out}

    async def listen_disks(self, vm: str, migration: str, tls: bool, peer: str) -> str:
        """Precopy: the disk service listens on this host's migration address for ``peer``'s mirror,
        for this migration only."""
        self._require_tls(tls, "disks")
        target = self._coming(vm, peer)
        if migration != self._migration(vm):
            raise Conflict(f"VM {vm!r} comes in for migration {self._migration(vm)}, not {migration}")
        result: str = await self._side(target.listen_disks(migration, peer=peer, tls=tls))
        return result

    async def relocation(self, vm: str, disk: str, action: str, peer: str) -> dict[str, Any]:
        """Pause, resume or invalidate (the switchover) a disk's relocation."""
        target = self._arrived(vm, peer)
        result: dict[str, Any] = await self._side(target.relocation(disk, action))
        return result

    async def disk_status(self, vm: str, peer: str) -> dict[str, Any]:
        """How each disk is served now."""
        result: dict[str, Any] = await self._side(self._arrived(vm, peer).disk_status())
        return result

    async def disk_stats(self, vm: str, peer: str) -> dict[str, Any]:
        """The disk service's request statistics."""
        result: dict[str, Any] = await self._side(self._arrived(vm, peer).disk_stats())
        return result

    async def set_patience(self, vm: str, seconds: float | None, peer: str) -> None:
        """How long a disk request waits for a lost source."""
        await self._side(self._arrived(vm, peer).set_patience(seconds))

    async def resume(self, vm: str, peer: str, token: int | None = None) -> None:
        """The guest runs here; in a cluster only once the owner key names this host with ``token``."""
        target = self._coming(vm, peer)
        if self.host.cluster is not None:
            await self.host.cluster.check_token(target.home.load_spec(), token)
        await self._side(target.resume(token))
        self._mark_resumed(vm, self._row(vm))

    async def committed(self, vm: str, peer: str, migration: str, token: int | None = None) -> None:
        """The migration committed to this host and the VM died before it resumed: like a resumed one,
        it is this host's to start again (see AgentHost.protect). Repeating it is harmless.

        Only for the migration that brings it, only once its QEMU is gone (a live one is resumed,
        not started again), and in a cluster only with the owner key naming this host."""
        target = self._coming(vm, peer)  # NotFound unless it comes in from ``peer``
        if self._migration(vm) != migration:
            raise Conflict(f"VM {vm!r} comes in by another migration than {migration}")
        if self.host.cluster is not None:
            await self.host.cluster.check_token(target.home.load_spec(), token)
        row = self._row(vm)
        if self.detail(row).get("resumed"):
            return  # said before (a job taken over says it again), or resumed here
        if await target.qemu_alive():
            raise Conflict(f"VM {vm!r}: its QEMU runs here: it is resumed, not started again")
        self._mark_resumed(vm, row)

    def _mark_resumed(self, vm: str, row: dict[str, Any]) -> None:
        """Past the commit the VM is this host's: if its QEMU dies before the migration ends, a person
        (or its supervisor's owner) may start it again here (see AgentHost.protect)."""
        detail = {**self.detail(row), "resumed": True}
        self.db.set_vm(vm, row["datastore"], row.get("uuid"), INCOMING, json.dumps(detail))

    async def announce(self, vm: str, peer: str) -> None:
        """The VM's NICs announce their MACs from here."""
        await self._side(self._arrived(vm, peer).announce())

    async def status(self, vm: str, peer: str) -> dict[str, Any]:
        """The incoming VM's supervisor status (also once finished: a job taken over asks)."""
        result: dict[str, Any] = await self._side(
            self._target(vm, peer, INCOMING, RUNNING, SERVING).vm_status()
        )
        return result

    async def running(self, vm: str, peer: str) -> bool:
        """Whether the incoming VM's supervisor runs."""
        return await self._target(vm, peer, INCOMING, RUNNING, SERVING).is_running()

    async def spec_toml(self, vm: str, peer: str) -> str:
        """The incoming VM's ``vm.toml``."""
        return self._target(vm, peer, INCOMING, RUNNING, SERVING).home.spec_file.read_text()

    # --- the end ------------------------------------------------------------------------------------------

    async def finish(self, vm: str, peer: str) -> None:
        """The migration is done: the VM is this host's (no peer can remove it any more, nor reach its
        disks here). Repeating it is harmless (a job taken over repeats its last step)."""
        row = self._row(vm)
        # STOPPED: a powered-off VM that came home to the host holding its disks (``stop_serving``).
        target = self._target(vm, peer, INCOMING, RUNNING, STOPPED)
        await self._side(target.finish())
        spec = target.home.load_spec()
        detail = {"source_host": peer, "migration": self.detail(row).get("migration")}
        state = STOPPED if row.get("state") == STOPPED else RUNNING
        self.db.set_vm(vm, row["datastore"], str(spec.uuid), state, json.dumps(detail))

    async def stop_serving(self, vm: str, peer: str) -> None:
        """A powered-off VM came home: the serving supervisor stops; the home is the VM's again."""
        row = self._row(vm)
        target = self._target(vm, peer, SERVING, INCOMING)
        await self._side(target.stop_serving())
        # The row remembers where it came from: the migration's last step (``finish``) asks for it
        # (without, an offline move home ended "failed" after its commit: "no VM coming in").
        detail = {"source_host": peer, "migration": self.detail(row).get("migration")}
        self.db.set_vm(vm, row["datastore"], row.get("uuid"), STOPPED, json.dumps(detail))

    async def remove(self, vm: str, peer: str) -> None:
        """Roll back: the incoming VM goes, with its home (a VM that was coming home serves again)."""
        row = self._row(vm)
        if row.get("state") == SERVING and self.peer_of(row) == peer:
            return  # rolled back before (a take-back whose abort was repeated)
        if not row and vm not in self.host.homes():
            return  # removed before (a repeated rollback, or this host settled the migration itself)
        target = self._coming(vm, peer)
        detail = self.detail(row)
        if detail.get("takes_back"):
            await self._side(target.abort_take_back())
            held = json.dumps({"holding_for": peer, "migration": detail.get("migration")})
            self.db.set_vm(vm, row["datastore"], row.get("uuid"), SERVING, held)
            return
        await target.remove()
        self.db.forget_vm(vm)

    async def remove_abandoned(self, vm: str) -> None:
        """A VM whose migration ended at its source without a commit (the source said so)."""
        row = self._row(vm)
        peer = self.peer_of(row)
        if row.get("state") == INCOMING and peer is not None:
            await self.remove(vm, peer)

    async def release_held(self, vm: str, migration: str, peer: str) -> None:
        """The VM no longer needs its disks here (it moved them, or they were pulled in elsewhere); only
        the host it runs on says so."""
        row = self._row(vm)
        if not row:
            return  # released before
        if row.get("state") != SERVING or self.peer_of(row) != peer:
            raise Conflict(f"this host holds no disks of VM {vm!r} for {peer}")
        target = self._target(vm, peer, SERVING)
        try:
            await release_holder_by_path(
                Holder(host=self.host.config.name, home=str(target.home.path)), migration
            )
        except SideError as exc:
            raise Conflict(str(exc)) from None
        self.db.forget_vm(vm)
        log.info("released the disks of VM %s (migration %s, asked by %s)", vm, migration, peer)
