"""The destination of a migration as a job sees it: typed operations on a datastore of some host, where
the VM's home is made, its incoming supervisor started and driven, and everything removed on rollback.

The operations are what a migration needs and no more: no QMP command, control verb, path or address is
chosen by the caller (the destination listens on its own migration address, uses its own TLS
credentials, and serves the disks of this VM only). :class:`LocalDestination` is a datastore this
process reaches by path (two "hosts" on one machine, or the same host); a destination behind another
host's agent implements the same class in the agent layer, over that agent's API.
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
from hikkoshi.daemons import supervisor_client
from hikkoshi.identity.names import qemu_identity
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.disk_pull import pull_disk
from hikkoshi.migrate.home_files import copy_home_files
from hikkoshi.migrate.precheck import Side
from hikkoshi.migrate.sides import ServiceDown, SideError, VmSide
from hikkoshi.vm.disk_serving import DiskPlan, Holder
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, qemu_version, space
from hikkoshi.vm.spec import VmSpec


@dataclass(frozen=True)
class DestinationFacts:
    """What the destination says before anything moves."""

    side: Side
    datastore_exists: bool
    home_exists: bool
    holds_vm: bool = False
    """The destination holds this VM's disks already (shared storage: the VM comes home)."""
    uuid: str | None = None
    """The uuid of the VM whose home is there, if one is."""


class Destination(abc.ABC):
    """Where a migration goes (see the module's docstring)."""

    label = "destination"
    host = "local"
    """The destination host's name."""
    datastore: Path
    """The destination datastore, in the destination host's terms (for the record)."""
    runtime_dir: Path | None = None
    agent: str | None = None
    """The URL of the destination host's agent, if it is reached through one (for the record)."""
    tls_name: str | None = None
    """The name the destination host's certificate has: its streams are checked against it (``None``:
    its address, as a destination reached by path with hand-made certificates)."""

    def __init__(self, vm: str) -> None:
        self.vm = vm

    @property
    def home_path(self) -> Path:
        """The VM's home there."""
        return self.datastore / self.vm

    # --- before the VM is there --------------------------------------------------------------------------

    @abc.abstractmethod
    def holds(self, holder: Holder) -> bool:
        """Whether ``holder`` (of a shared disk) is this destination."""

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
    async def save_plan(self, plan: DiskPlan) -> None:
        """How each disk is served there (written before the supervisor starts)."""

    @abc.abstractmethod
    async def pull_disks(self, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        """Cold migration: copy each disk (file name to export URI and size) completely from the
        source's read-only export into the home, flushed; what each copy fetched."""

    @abc.abstractmethod
    async def start_incoming(self, accel: str, qemu: str | None, migration: str) -> dict[str, Any]:
        """Start the VM's supervisor waiting for the stream (or, where the destination holds the VM's
        disks, let its serving supervisor take QEMU up again); what it reported."""

    # --- the memory stream -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def prepare_stream(self, *, postcopy: bool, tls: bool, peer: str | None = None) -> None:
        """QEMU's incoming side: events on, post-copy RAM if allowed, TLS with the host's credentials
        accepting the stream from ``peer``'s certificate only (``None``: any of the cluster CA; a
        destination behind an agent knows its caller by its certificate and ignores this)."""

    @abc.abstractmethod
    async def listen_stream(self) -> tuple[str, int]:
        """QEMU listens for the stream on the destination's migration address; (host, port)."""

    @abc.abstractmethod
    async def wait_incoming(self, limit: float) -> qm.MigrationInfo:
        """The incoming migration once it ended (or after ``limit`` seconds, ``timed_out``)."""

    # --- the disks ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def listen_disks(self, migration: str, *, peer: str | None, tls: bool) -> str:
        """Precopy: the VM's disk service listens on the migration address for the source's mirror, for
        this migration only, admitting ``peer``'s certificate only (with TLS; an agent knows its caller
        by its certificate); ``host:port``."""

    @abc.abstractmethod
    async def relocation(self, disk: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume`` or ``invalidate`` (the switchover) the relocation of ``disk``."""

    @abc.abstractmethod
    async def disk_status(self) -> dict[str, dict[str, Any]]:
        """How each disk is served there now, with a relocation's progress."""

    @abc.abstractmethod
    async def disk_stats(self) -> dict[str, Any]:
        """The disk service's request statistics (the guest's I/O there)."""

    @abc.abstractmethod
    async def set_patience(self, seconds: float | None) -> None:
        """How long a disk request there waits for a lost source (``None``: as long as it takes)."""

    # --- the VM ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def resume(self, token: int | None = None) -> None:
        """The guest runs there (after the commit); ``token``: the fencing token of the VM's ownership
        there, when a cluster records it (the destination checks it before it lets the guest run)."""

    @abc.abstractmethod
    async def committed(self, migration: str, token: int | None = None) -> None:
        """Migration ``migration`` committed to the destination (in a cluster: owner key ``token``),
        whose VM died before it resumed: it may be started there again (an agent refuses to start a
        VM still coming in until told so)."""

    @abc.abstractmethod
    async def announce(self) -> None:
        """The VM's NICs announce their MACs from there."""

    @abc.abstractmethod
    async def vm_status(self) -> dict[str, Any]:
        """The supervisor's status (``state``: QEMU's run state; ``supervisor``: its own)."""

    @abc.abstractmethod
    async def is_running(self) -> bool:
        """Whether the VM's supervisor runs there."""

    async def qemu_alive(self) -> bool:
        """Whether the VM's QEMU is there: its supervisor runs and names one (a supervisor may outlive
        its QEMU a moment; one that does not answer is not known to have one)."""
        if not await self.is_running():
            return False
        try:
            return (await self.vm_status()).get("qemu_pid") is not None
        except SideError:
            return False

    @abc.abstractmethod
    async def home_exists(self) -> bool:
        """Whether the VM's home exists there."""

    @abc.abstractmethod
    async def load_spec(self) -> VmSpec:
        """The VM's spec from the destination's home."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """The migration is done: the VM is the destination's (which may then refuse :meth:`remove`);
        no other host reaches its disks there any more (every listener for one closes)."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Roll back: the incoming VM there goes, with the home this migration made."""

    @abc.abstractmethod
    async def stop_serving(self) -> None:
        """A powered-off VM came home to the host that holds its disks: its serving supervisor stops,
        and the home there is the VM's again."""

    @abc.abstractmethod
    async def abort_take_back(self) -> None:
        """Roll back a VM that was coming home to the host that holds its disks: its incoming QEMU goes,
        its supervisor serves the disks again, nothing of the home is touched."""


class LocalDestination(Destination):
    """A datastore this process reaches by path."""

    def __init__(
        self,
        vm: str,
        datastore: Path,
        runtime_dir: Path | None = None,
        *,
        address: str = "127.0.0.1",
        tls_dir: Path | None = None,
        tls_name: str | None = None,
    ) -> None:
        """``tls_dir``: the destination host's TLS files (QEMU's layout), for every stream of a migration
        that asks for TLS; ``tls_name``: the name its certificate has."""
        super().__init__(vm)
        self.datastore = datastore
        self.runtime_dir = runtime_dir
        self.address = address
        self.tls_dir = tls_dir
        self.tls_name = tls_name
        self.home = VmHome(datastore / vm)
        self._side: VmSide | None = None

    def side(self) -> VmSide:
        """The VM's supervisor there."""
        if self._side is None:
            try:
                spec = self.home.load_spec()
            except (OSError, ValueError) as exc:
                raise SideError(f"destination: no VM in {self.home.path}: {exc}") from None
            self._side = VmSide(self.home, spec, self.label)
        return self._side

    def holds(self, holder: Holder) -> bool:
        return holder.home is not None and Path(holder.home) == self.home.path

    def _serving(self) -> bool:
        state = self.home.read_state()
        return self.home.path.exists() and self.home.is_running() and state.get("state") == "serving"

    async def describe(self, accel: str, qemu: str) -> DestinationFacts:
        facts = await asyncio.to_thread(host_facts)
        version = await asyncio.to_thread(qemu_version, qemu)
        exists = self.datastore.is_dir()
        free = space(self.datastore).free if exists else 0
        uuid = None
        if self.home.spec_file.exists():
            try:
                uuid = str(self.home.load_spec().uuid)
            except (OSError, ValueError):
                uuid = None
        return DestinationFacts(
            Side(facts, accel, version, __version__, free),
            exists,
            self.home.path.exists(),
            holds_vm=self._serving(),
            uuid=uuid,
        )

    async def create_home(self, source_home: Path, disk_files: set[str]) -> int:
        self.home.path.mkdir(mode=0o700)
        self.home.path.chmod(0o700)  # the VM's alone, whatever the umask
        return await asyncio.to_thread(copy_home_files, source_home, self.home.path, disk_files)

    async def create_disks(self, sizes: dict[str, int]) -> None:
        for name, size in sizes.items():
            fd = os.open(self.home.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

    async def save_plan(self, plan: DiskPlan) -> None:
        self.home.save_disk_plan(plan)

    async def pull_disks(self, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}

        async def pull(name: str, uri: str, size: int) -> None:
            status = await pull_disk(
                uri, self.home.path / name, size, log=self.home.nbd_log, tls_dir=self.tls_dir
            )
            keys = ("fetched_background_bytes", "fetched_demand_bytes", "zero_bytes", "size")
            results[name] = {k: status.get(k) for k in keys}

        async with asyncio.TaskGroup() as tg:
            for name, (uri, size) in disks.items():
                tg.create_task(pull(name, uri, size))
        await asyncio.to_thread(fsync_dir, self.home.path)
        return results

    async def start_incoming(self, accel: str, qemu: str | None, migration: str) -> dict[str, Any]:
        if self._serving():
            result: dict[str, Any] = await self.side().ctl("start-incoming", migration=migration)
            return result
        return await asyncio.to_thread(
            supervisor_client.start_vm,
            self.home,
            accel=accel,
            qemu=qemu,
            incoming=True,
            runtime_dir=self.runtime_dir,
            tls_dir=self.tls_dir,
        )

    def _tls_dir(self) -> Path:
        if self.tls_dir is None:
            raise SideError("destination: TLS asked for but it has no TLS files")
        return self.tls_dir.absolute()

    async def prepare_stream(self, *, postcopy: bool, tls: bool, peer: str | None = None) -> None:
        side = self.side()
        caps = {"events": True}
        if postcopy:
            caps["postcopy_ram"] = True
        await qm.set_capabilities(side, **caps)
        if tls:
            await qm.add_tls(side, str(self._tls_dir()), "server")
            await qm.set_parameters(side, tls_creds=qm.TLS_ID)
            if peer is not None:
                # A certificate of the cluster is not enough: it must be the source host's.
                await qm.accept_only(side, qemu_identity(peer))

    async def listen_stream(self) -> tuple[str, int]:
        host = self.address
        target = f"[{host}]" if ":" in host else host
        info = await qm.listen(self.side(), f"tcp:{target}:0")
        if not info.listening:
            raise SideError("the destination QEMU did not say where it listens for the stream")
        return host, info.listening[0][1]

    async def wait_incoming(self, limit: float) -> qm.MigrationInfo:
        return await qm.wait(self.side(), qm.TERMINAL, limit)

    async def listen_disks(self, migration: str, *, peer: str | None, tls: bool) -> str:
        args: dict[str, Any] = {"address": f"{self.address}:0", "migration": migration}
        if tls:
            args["tls_dir"] = str(self._tls_dir())
            if peer is not None:
                args["peer"] = peer
        names = await self.side().disks("listen", **args)
        return str(names[0])

    async def relocation(self, disk: str, action: str) -> dict[str, Any]:
        if action not in ("pause", "resume", "invalidate"):
            raise ValueError(f"no relocation action {action!r}")
        result: dict[str, Any] = await self.side().disks(action, export=disk)
        return result

    async def disk_status(self) -> dict[str, dict[str, Any]]:
        return await self.side().disk_status()

    async def disk_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.side().disks("stats")
        return result

    async def set_patience(self, seconds: float | None) -> None:
        await self.side().disks("patience", seconds=seconds)

    async def committed(self, migration: str, token: int | None = None) -> None:
        return None  # on this host no agent guards the incoming VM: nothing to tell

    async def resume(self, token: int | None = None) -> None:
        await self.side().ctl("resume")

    async def announce(self) -> None:
        await qm.announce(self.side())

    async def vm_status(self) -> dict[str, Any]:
        return await self.side().status()

    async def is_running(self) -> bool:
        return self.home.path.exists() and self.home.is_running()

    async def home_exists(self) -> bool:
        return self.home.path.exists()

    async def load_spec(self) -> VmSpec:
        return self.home.load_spec()

    async def finish(self) -> None:
        if self.home.is_running() and self.home.read_state().get("nbd_control"):
            # Precopy's mirror target, a holder's listener for the host the VM came from: all closed.
            # A disk service being restarted (killed past the commit) is waited for: the migration is
            # done, and its end must not fail on the moment the service was away. A VM whose QEMU died
            # meanwhile took its disk service along: nothing listens any more.
            try:
                await self.side().disks_patiently("unlisten", all=True)
            except ServiceDown:
                if self.home.is_running():
                    raise
        # The start facts (geometry, migration) served their purpose; relocations keep their entries.
        plan = self.home.load_disk_plan()
        self.home.save_disk_plan(plan.model_copy(update={"geometry": {}, "migration": None}))
        await self._close_listeners()

    async def _close_listeners(self) -> None:
        """The VM is this host's now: its disk service serves its own QEMU alone. Network listeners a
        migration opened there (precopy's mirror target, the export a holder served the host the VM came
        back from) close; left open they would expose the disks on the migration network for good."""
        try:
            listening = await self.side().disks_patiently("listening")
        except SideError:
            return  # no disk service: nothing listens
        for address in listening:
            if not str(address).startswith("unix:"):
                await self.side().disks("unlisten", address=address)

    async def remove(self) -> None:
        if self.home.path.exists() and self.home.is_running():
            await asyncio.to_thread(supervisor_client.kill_vm, self.home)
        if self.home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.home.path)

    async def stop_serving(self) -> None:
        if self.home.path.exists() and self.home.is_running():
            await self.side().ctl("stop-serving", migration="cold")
            if not await asyncio.to_thread(supervisor_client.wait_stopped, self.home, 60):
                raise SideError("the destination's serving supervisor did not stop")

    async def abort_take_back(self) -> None:
        if self.home.path.exists() and self.home.is_running():
            await self.side().ctl("abort-incoming", migration="rollback")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
