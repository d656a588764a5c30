"""The disk service: every disk of one VM on this host, each an export of one NBD server, whatever
serves its bytes (a file, a relocation, the holder of a shared disk; see :mod:`served_disk`).

There is exactly one per VM per host, started and restarted by the VM's supervisor (``python -m
hikkoshi.daemons.disk_service --home HOME ...``); QEMU always reaches every disk here, on the VM's Unix
socket, so a migration, a relocation finishing or a disk pulled in from its holder never changes what
QEMU opened. The service reads the home's disk plan at start and keeps it true at every change.
``hikkoshi nbd serve IMAGE...`` runs the same service over image files given by hand.

Control verbs (see :meth:`DiskService.verbs`): status, exports, statistics, extra listeners for a
migration's peer, dirty bitmaps, storage moves, relocation control (pause, resume, bandwidth, the
switchover's invalidation, patience with a lost source), pulling a remote disk in, and a new home.
SIGTERM or SIGINT: requests in flight finish, everything is flushed, the service exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from hikkoshi.block.dirty_bitmap import DEFAULT_GRANULARITY
from hikkoshi.block.move import MoveError, StorageMove
from hikkoshi.block.move_journal import MoveJournalError
from hikkoshi.block.move_policy import Mode
from hikkoshi.block.throttle import parse_rate
from hikkoshi.block.tracking import TrackedDevice
from hikkoshi.daemons.entry import READY_PREFIX
from hikkoshi.daemons.moves import MoveService
from hikkoshi.daemons.process import run_reporting
from hikkoshi.daemons.relocation import BitmapMismatch
from hikkoshi.daemons.served_disk import ServedDisk
from hikkoshi.daemons.verbs import Args, NoArgs, Verbs
from hikkoshi.identity.names import check_host_name, is_loopback, is_wildcard
from hikkoshi.identity.tls_dir import TlsDir
from hikkoshi.nbd.access import Access
from hikkoshi.nbd.address import parse_address
from hikkoshi.nbd.control import ControlError, ControlServer
from hikkoshi.nbd.limits import ServerLimits
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer
from hikkoshi.vm.disk_serving import DiskServing, PeerListener, Serving
from hikkoshi.vm.home import VmHome

log = logging.getLogger("hikkoshi.daemons.disk_service")


# --- verb arguments ----------------------------------------------------------------------------------------

ExportName = str | None


class OneExport(Args):
    export: ExportName = None


class Stats(Args):
    export: ExportName = None
    regions: bool = False


class Listen(Args):
    address: str = Field(min_length=1, max_length=300)
    """``HOST:PORT`` (port 0 picks one): a concrete address, never a wildcard."""
    peer: str | None = Field(default=None, min_length=1, max_length=253)
    """The host name a client's certificate must name (with ``tls_dir``)."""
    read_only: bool = False
    tls_dir: str | None = Field(default=None, min_length=2, max_length=4096, pattern=r"^/")
    """This host's TLS files (QEMU's layout); without them: plain TCP, on a loopback address only."""
    migration: str | None = Field(default=None, min_length=1, max_length=64)
    """The migration the listener is for (``unlisten`` by it)."""


class Unlisten(Args):
    address: str | None = Field(default=None, min_length=1, max_length=300)
    migration: str | None = Field(default=None, min_length=1, max_length=64)
    all: bool = False
    """Every listener for another host."""


class Bitmap(Args):
    export: ExportName = None
    name: str = Field(min_length=1, max_length=64)


class BitmapAdd(Bitmap):
    granularity: int = Field(default=DEFAULT_GRANULARITY, ge=512, le=1 << 30)


class Move(Args):
    export: ExportName = None
    to: str = Field(min_length=1, max_length=4096)
    mode: Literal["mirror", "dbt"] = "mirror"
    bandwidth: str | None = None
    thick: bool = False


class Rate(Args):
    export: ExportName = None
    rate: str | None = None
    """e.g. ``50M``; none or ``unlimited``: no limit."""


class Patience(Args):
    export: ExportName = None
    seconds: float | None = Field(default=None, ge=0)
    """How long a request waits for a lost source; none: as long as it takes."""


class Rehome(Args):
    home: str = Field(min_length=1, max_length=4096)


# --- the service -------------------------------------------------------------------------------------------


class DiskService:
    """Serves disks until stopped (see the module's docstring)."""

    def __init__(
        self,
        disks: list[ServedDisk],
        listen: list[ListenAddress],
        control: Path | None,
        *,
        tls: ssl.SSLContext | None = None,
        home: VmHome | None = None,
        limits: ServerLimits | None = None,
        peers: frozenset[str] | None = None,
    ) -> None:
        """``tls`` and ``peers``: what the addresses in ``listen`` allow (by hand: ``nbd serve --tls-*``)."""
        if not disks:
            raise ValueError("a disk service needs at least one disk")
        self.disks: dict[str, ServedDisk] = {}
        for disk in disks:
            if disk.name in self.disks:
                raise ValueError(f"duplicate export name {disk.name!r}")
            self.disks[disk.name] = disk
        self.listen = listen
        self.control_path = control
        self.tls = tls
        self.peers = peers
        self.limits = limits or ServerLimits()
        #: The VM's home, whose disk plan this service keeps true (``None``: images served by hand).
        self.home = home
        self.exports = ExportTable()
        self.server: NbdServer | None = None
        self.moves = MoveService()
        self.verbs = Verbs()
        self._declare()
        for disk in disks:
            disk.record = self.record  # one writer of the plan

    def record(self, disk: str, serving: DiskServing) -> None:
        """A disk is served another way from now on: the plan says so, durably, before it counts."""
        if self.home is not None:
            self.home.save_disk_plan(self.home.load_disk_plan().with_disk(disk, serving))

    def _record_listeners(self, change: Any) -> None:
        """The plan's peer listeners, changed by ``change(listeners) -> listeners``."""
        if self.home is not None:
            plan = self.home.load_disk_plan()
            self.home.save_disk_plan(plan.with_listeners(tuple(change(plan.listeners))))

    # --- running -------------------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Open the disks, serve until SIGTERM/SIGINT; the exit status."""
        try:
            for disk in self.disks.values():
                device = await disk.open()
                self.exports.add(Export(disk.name, device, description=disk.description))
            server = self.server = NbdServer(
                self.exports, self.listen, tls=self.tls, limits=self.limits, peers=self.peers
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, server.stop)
            control = ControlServer(self.control_path) if self.control_path else None
            try:
                return await self._serve(server, control)
            finally:
                if control is not None:
                    await control.close()
        finally:
            for disk in self.disks.values():
                await disk.close()

    async def _serve(self, server: NbdServer, control: ControlServer | None) -> int:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve())
            tg.create_task(self.moves.run())
            lives = [tg.create_task(disk.run(tg)) for disk in self.disks.values()]

            def stopped(_task: asyncio.Task[None]) -> None:
                # Moves end (each undoing itself unless already switched), relocations stop copying.
                self.moves.close()
                for life in lives:
                    life.cancel()

            serving.add_done_callback(stopped)
            ready = tg.create_task(server.ready.wait())
            await asyncio.wait([serving, ready], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                ready.cancel()
                return 1
            await self._listen_again(server)
            if control is not None:
                self.verbs.install(control)
                await control.start()
            announce(server)
        return 0

    async def _listen_again(self, server: NbdServer) -> None:
        """The peer listeners the plan remembers (the service restarted): on the same addresses."""
        if self.home is None:
            return
        for listener in self.home.load_disk_plan().listeners:
            try:
                await server.add_listener(ListenAddress.parse(listener.address), peer_access(listener))
            except (OSError, ValueError) as exc:
                # Its peer cannot reach the disks until someone opens another; say so loudly.
                log.error("cannot listen again on %s for %s: %s", listener.address, listener.peer, exc)

    # --- helpers for verbs ---------------------------------------------------------------------------------

    def _disk(self, name: str | None) -> ServedDisk:
        if name is None:
            if len(self.disks) != 1:
                raise ControlError(f"{len(self.disks)} disks: say which one (export)")
            return next(iter(self.disks.values()))
        disk = self.disks.get(name)
        if disk is None:
            raise ControlError(f"no export named {name!r}")
        return disk

    def _selected(self, name: str | None) -> list[ServedDisk]:
        return list(self.disks.values()) if name is None else [self._disk(name)]

    def _tracker(self, name: str | None) -> TrackedDevice:
        device = self._disk(name).tracked
        if device is None:
            raise ControlError("the disk is not open")
        return device

    def _export(self, name: str) -> Export:
        export = self.exports.get(name)
        assert export is not None
        return export

    def _running_server(self) -> NbdServer:
        if self.server is None:
            raise ControlError("the service is not serving")
        return self.server

    # --- verbs ---------------------------------------------------------------------------------------------

    def _declare(self) -> None:
        verb = self.verbs.verb

        @verb("status", NoArgs, "how each disk is served (file, relocating, remote), with progress")
        def status(_a: NoArgs) -> dict[str, Any]:
            server = self.server
            return {
                "disks": {name: d.status() for name, d in self.disks.items()},
                "listening": list(server.bound) if server else [],
                "listeners": [{"names": n, **a.describe()} for n, a in server.listeners()] if server else [],
            }

        @verb("exports", NoArgs, "list exports")
        def exports(_a: NoArgs) -> list[dict[str, Any]]:
            out = []
            for name, disk in self.disks.items():
                export = self._export(name)
                out.append(
                    {
                        "name": name,
                        "size": disk.size,
                        "kind": disk.serving.kind.value,
                        "path": str(disk.served_path) if disk.served_path else None,
                        "read_only": disk.read_only,
                        "connections": export.stats.connections,
                    }
                )
            return out

        @verb("stats", Stats, "requests, bytes and latency per export")
        def stats(a: Stats) -> dict[str, Any]:
            return {
                d.name: {"size": d.size, **self._export(d.name).stats.snapshot(a.regions)}
                for d in self._selected(a.export)
            }

        @verb("listening", NoArgs, "addresses the service listens on")
        def listening(_a: NoArgs) -> list[str]:
            return list(self._running_server().bound)

        @verb(
            "listen",
            Listen,
            "listen for another host on HOST:PORT (port 0 picks): TLS admitting the peer's certificate "
            "only (tls_dir, peer), read_only; without tls_dir on a loopback address only",
        )
        async def listen(a: Listen) -> list[str]:
            listener = PeerListener(
                address=a.address,
                peer=a.peer,
                read_only=a.read_only,
                tls_dir=a.tls_dir,
                migration=a.migration,
            )
            try:
                addr, access = ListenAddress.parse(a.address), peer_access(listener)
            except ValueError as exc:
                raise ControlError(f"listen: {exc}") from None
            try:
                names = await self._running_server().add_listener(addr, access)
            except OSError as exc:
                raise ControlError(f"cannot listen on {a.address}: {exc}") from None
            bound = listener.model_copy(update={"address": names[0]})
            self._record_listeners(lambda old: [*old, bound])
            return names

        @verb(
            "unlisten",
            Unlisten,
            "stop listening for another host: by address, every listener of a migration, or all; the "
            "connections made through them end",
        )
        def unlisten(a: Unlisten) -> dict[str, int]:
            if sum((a.address is not None, a.migration is not None, a.all)) != 1:
                raise ControlError("unlisten: give one of address, migration, all")
            server = self._running_server()
            if a.address is not None:
                names = [a.address]
            elif a.all:
                names = [
                    n for bound, access in server.listeners() if access is not server.access for n in bound
                ]
            else:
                known = self.home.load_disk_plan().listeners if self.home is not None else ()
                names = [x.address for x in known if x.migration == a.migration]
            # The peer loses what it was given: its connections end too.
            removed = sum(server.remove_listener(name, disconnect=True) for name in names)
            self._record_listeners(lambda old: [x for x in old if x.address not in names])
            return {"removed": removed}

        @verb("bitmap-add", BitmapAdd, "start a dirty bitmap")
        def bitmap_add(a: BitmapAdd) -> dict[str, Any]:
            bitmap = self._tracker(a.export).add_bitmap(a.name, a.granularity)
            return {"name": a.name, "granularity": bitmap.granularity}

        @verb("bitmap-list", OneExport, "dirty bitmaps of an export")
        def bitmap_list(a: OneExport) -> list[dict[str, Any]]:
            return [
                {"name": n, "granularity": b.granularity, "dirty_bytes": b.dirty_bytes}
                for n, b in self._tracker(a.export).bitmaps.items()
            ]

        @verb("bitmap-get", Bitmap, "dirty runs of a bitmap as [offset, length] pairs")
        def bitmap_get(a: Bitmap) -> dict[str, Any]:
            bitmap = self._tracker(a.export).bitmap(a.name)
            shift = bitmap.shift
            runs = [[f << shift, min(c << shift, bitmap.size - (f << shift))] for f, c in bitmap.runs()]
            return {"granularity": bitmap.granularity, "dirty_bytes": bitmap.dirty_bytes, "runs": runs}

        @verb("bitmap-clear", Bitmap, "mark a bitmap all clean")
        def bitmap_clear(a: Bitmap) -> None:
            self._tracker(a.export).bitmap(a.name).clear()

        @verb("bitmap-remove", Bitmap, "drop a dirty bitmap")
        def bitmap_remove(a: Bitmap) -> None:
            self._tracker(a.export).remove_bitmap(a.name)

        @verb("move", Move, "move the export's file elsewhere, live (storage vMotion)")
        def move(a: Move) -> dict[str, Any]:
            disk = self._disk(a.export)
            if disk.serving.kind != Serving.FILE:
                raise ControlError(f"disk {disk.name} is {disk.serving.kind}: only a file disk moves")
            try:
                job = StorageMove(
                    self._tracker(disk.name),
                    Path(a.to),
                    mode=Mode(a.mode),
                    thick=a.thick,
                    bandwidth=None if not a.bandwidth else parse_rate(a.bandwidth),
                )
                job.check()
            except MoveError as exc:
                raise ControlError(str(exc)) from None
            self.moves.start(disk.name, job)
            return job.progress.snapshot()

        @verb("move-status", OneExport, "progress of the current or last move")
        def move_status(a: OneExport) -> dict[str, Any]:
            name = self._disk(a.export).name
            job = self.moves.moves.get(name)
            if job is None:
                raise ControlError(f"no move of export {name!r} was started")
            return job.progress.snapshot()

        @verb("move-cancel", OneExport, "cancel a move (the source stays the disk)")
        def move_cancel(a: OneExport) -> dict[str, bool]:
            return {"cancelled": self.moves.cancel(self._disk(a.export).name)}

        @verb("pause", OneExport, "pause a relocation's background copy (a finished one: nothing to do)")
        def pause(a: OneExport) -> dict[str, Any]:
            disk = self._disk(a.export)
            if disk.relocation is None and disk.serving.kind == Serving.FILE:
                return disk.status()
            relocation = disk.need_relocation()
            relocation.pause()
            return relocation.status()

        @verb("resume", OneExport, "resume a relocation's background copy (a finished one: nothing to do)")
        def resume(a: OneExport) -> dict[str, Any]:
            disk = self._disk(a.export)
            if disk.relocation is None and disk.serving.kind == Serving.FILE:
                return disk.status()
            relocation = disk.need_relocation()
            relocation.resume()
            if disk.serving.background == "paused":
                disk.serving = disk.serving.model_copy(update={"background": "run"})
                self.record(disk.name, disk.serving)
            return relocation.status()

        @verb("bandwidth", Rate, "limit a relocation's background copy (rate e.g. 50M; none: unlimited)")
        def bandwidth(a: Rate) -> dict[str, Any]:
            relocation = self._disk(a.export).need_relocation()
            unlimited = a.rate in (None, "", "unlimited", "none")
            relocation.set_bandwidth(None if unlimited else parse_rate(str(a.rate)))
            return relocation.status()

        @verb("invalidate", OneExport, "switchover: drop cached blocks the source's dirty bitmap marks")
        async def invalidate(a: OneExport) -> dict[str, Any]:
            disk = self._disk(a.export)
            result = await disk.need_relocation().invalidate()
            # From now on the guest may write here: a restart must never drop blocks again.
            disk.serving = disk.serving.after_switchover()
            self.record(disk.name, disk.serving)
            return result

        @verb("patience", Patience, "how long requests wait for a lost source (none: as long as it takes)")
        def patience(a: Patience) -> dict[str, Any]:
            for disk in self._selected(a.export):
                if disk.relocation is not None:
                    disk.relocation.set_patience(a.seconds)
            return {"seconds": a.seconds}

        @verb("localize", OneExport, "pull a remote (shared) disk into its own file here")
        async def localize(a: OneExport) -> dict[str, Any]:
            disk = self._disk(a.export)
            await disk.localize()
            return disk.status()

        @verb("rehome", Rehome, "the VM's home moved (storage migration): keep its disk plan there")
        def rehome(a: Rehome) -> dict[str, str]:
            if self.home is None:
                raise ControlError("these disks have no home")
            self.home = VmHome(Path(a.home))
            return {"home": a.home}


def peer_access(listener: PeerListener) -> Access:
    """What a listener for another host allows (see :class:`~hikkoshi.vm.disk_serving.PeerListener`);
    :class:`ValueError` for one that would expose the disks beyond that host."""
    host, _port, unix = parse_address(listener.address)
    if unix is not None:
        raise ValueError("a listener for another host is a TCP address (HOST:PORT)")
    if is_wildcard(host):
        raise ValueError(f"{listener.address} is every address of this host: give the migration address")
    if listener.tls_dir is None:
        if not is_loopback(host):
            raise ValueError(f"without TLS a peer listens on a loopback address only, not {host}")
        return Access(read_only=listener.read_only)
    tls = TlsDir(Path(listener.tls_dir)).check().server_context(client_certificate="required")
    # Without a peer name (a migration by path, hand-made certificates): any certificate of the CA.
    peers = frozenset({check_host_name(listener.peer)}) if listener.peer is not None else None
    return Access(tls=tls, peers=peers, read_only=listener.read_only)


def announce(server: NbdServer) -> None:
    """Print where the service listens, as URIs (starters and scripts wait for these lines)."""
    scheme = "nbds" if server.tls else "nbd"
    for addr in server.bound:
        if addr.startswith("unix:"):
            print(f"{READY_PREFIX} {scheme}+unix:///?socket={addr[5:]}", flush=True)
        else:
            print(f"{READY_PREFIX} {scheme}://{addr}/", flush=True)


# --- entry points ------------------------------------------------------------------------------------------


def vm_disks(home: VmHome, tls: ssl.SSLContext | None = None) -> list[ServedDisk]:
    """Every disk of the VM in ``home``, served as its disk plan says (``tls``: the client context for
    ``nbds://`` sources and holders)."""
    spec = home.load_spec()
    plan = home.load_disk_plan()
    return [ServedDisk(d.name, home.disk_path(d), d.size, plan.serving(d.name), tls=tls) for d in spec.disks]


def main(argv: list[str] | None = None) -> int:
    """``python -m hikkoshi.daemons.disk_service --home HOME --listen ADDR --control unix:PATH``."""
    parser = argparse.ArgumentParser(prog="hikkoshi-disk-service", description=__doc__)
    parser.add_argument("--home", type=Path, required=True, help="the VM's home")
    parser.add_argument("--listen", action="append", required=True, metavar="ADDR")
    parser.add_argument("--control", required=True, metavar="unix:PATH")
    parser.add_argument(
        "--tls-dir", type=Path, metavar="DIR", help="this host's TLS files (QEMU layout), for nbds:// sources"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s disk-service %(levelname)s %(message)s"
    )
    home = VmHome(args.home.absolute())

    async def serve() -> int:
        tls = TlsDir(args.tls_dir.absolute()).check().client_context() if args.tls_dir else None
        service = DiskService(
            vm_disks(home, tls),
            [ListenAddress.parse(a) for a in args.listen],
            Path(args.control.removeprefix("unix:")),
            home=home,
        )
        return await service.serve()

    return run_reporting(
        serve(), "hikkoshi disk service", (OSError, ValueError, MoveJournalError, BitmapMismatch)
    )


if __name__ == "__main__":
    sys.exit(main())
