"""One agent's host: its configuration, datastores and the VMs in them (create, start, stop, console,
destroy). The datastores are the truth about which VMs exist; the database remembers the rest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hikkoshi import __version__
from hikkoshi.agent.db import AgentDb
from hikkoshi.agent.errors import Conflict, NotFound, Problem
from hikkoshi.agent.models import DatastoreInfo, DiskInfo, HostInfo, NicInfo, VmCreate, VmInfo, VmStop
from hikkoshi.agent.vm_rows import RowState
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.guest_image import build_guest
from hikkoshi.guest.guest_vm import create_guest_vm
from hikkoshi.guest.workloads import WORKLOADS
from hikkoshi.identity.credentials import HostCredentials
from hikkoshi.vm.accel import DEFAULT_QEMU, choose_accel
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.errors import DatastoreError, VmError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, qemu_version, space
from hikkoshi.vm.host_policy import HostPolicy
from hikkoshi.vm.procs import alive
from hikkoshi.vm.spec import VmSpec, parse_spec

if TYPE_CHECKING:
    from hikkoshi.agent.cluster_member import ClusterMember, ClusterSettings


@dataclass
class AgentConfig:
    """How an agent was started."""

    name: str
    """The host's name: the one its certificate names."""
    host: str
    port: int
    datastores: dict[str, Path]
    """Name to path; the first is the default."""
    state_dir: Path
    token: str
    """For people and scripts (the user routes); never sent to, nor taken from, another agent."""
    credentials: HostCredentials
    """This host's certificate, key and the cluster CA: the API, the calls to other agents, QEMU, NBD."""
    site: str = "default"
    qemu: str = DEFAULT_QEMU
    migration_host: str | None = None
    """The address migration streams (memory, disks) use here (default: the API's)."""
    insecure_loopback: bool = False
    """Streams between hosts (memory, disks) in plain TCP: only for a lab or tests on loopback."""
    allow_dirs: tuple[Path, ...] = ()
    """Directories (beside the datastores) VM kernels, initrds and images may come from."""
    allow_wildcard_forwards: bool = False
    """Whether a VM's port may be forwarded from every address of the host."""
    cluster: ClusterSettings | None = None
    """The etcd cluster this host joins (``None``: the agent works alone)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def migration_address(self) -> str:
        """Where this host's migration streams listen and connect from."""
        return self.migration_host or self.host

    @property
    def runtime_dir(self) -> Path:
        """Where this host's VMs keep their sockets (``HIKKOSHI_RUNTIME_DIR`` of its supervisors)."""
        return self.state_dir / "run"

    @property
    def tls_dir(self) -> Path:
        """The host's TLS files in QEMU's layout (written at start), for its daemons and QEMU."""
        return self.state_dir / "tls"

    @property
    def encrypt(self) -> bool:
        """Whether migrations encrypt their streams (every one does, unless ``--insecure-loopback``)."""
        return not self.insecure_loopback

    @property
    def policy(self) -> HostPolicy:
        """What VMs may use here (see :mod:`hikkoshi.vm.host_policy`)."""
        return HostPolicy(
            allowed_dirs=(*self.datastores.values(), *self.allow_dirs),
            wildcard_forwards=self.allow_wildcard_forwards,
        )

    @property
    def url(self) -> str:
        """The agent's own URL (always HTTPS: its certificate is the host's)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def _vm_info(name: str, ds: str, home: VmHome, spec: VmSpec | None, status: dict[str, Any]) -> VmInfo:
    return VmInfo(
        name=name,
        datastore=ds,
        uuid=str(spec.uuid) if spec else None,
        running=bool(status.get("running")),
        state=str(status.get("state", "stopped")),
        memory_mib=spec.memory_mib if spec else None,
        cpus=spec.cpus if spec else None,
        disks=[DiskInfo(name=d.name, size=d.size, provisioning=d.provisioning) for d in spec.disks]
        if spec
        else [],
        nics=[NicInfo(mac=n.mac, network=n.network) for n in spec.nics] if spec else [],
        supervisor_pid=status.get("supervisor_pid"),
        qemu_pid=status.get("qemu_pid"),
        accel=status.get("accel"),
        error=status.get("error") or status.get("last_error"),
    )


class Host:
    """The datastores and VMs of this agent's host."""

    def __init__(self, config: AgentConfig, db: AgentDb) -> None:
        self.config = config
        self.db = db
        self.stores: dict[str, Datastore] = {}
        for name, path in config.datastores.items():
            path.mkdir(parents=True, exist_ok=True)
            try:
                self.stores[name] = Datastore.open(path)
            except DatastoreError:
                self.stores[name] = Datastore.init(path, name)
        config.runtime_dir.mkdir(parents=True, exist_ok=True)
        self._accel: str | None = None
        self._accel_lock = asyncio.Lock()
        #: VMs being created, started, stopped or destroyed now: one operation per VM at a time.
        self._busy: set[str] = set()
        #: The cluster this host is a member of (set by the agent once it joined).
        self.cluster: ClusterMember | None = None

    # --- host ---------------------------------------------------------------------------------------------

    async def accel(self) -> str:
        """The accelerator VMs get here (found once: it may boot a test guest under KVM)."""
        async with self._accel_lock:
            if self._accel is None:
                self._accel = await asyncio.to_thread(choose_accel, "auto", qemu=self.config.qemu)
            return self._accel

    def datastore(self, name: str | None) -> tuple[str, Datastore]:
        """A datastore by name (``None``: the first)."""
        if name is None:
            name = next(iter(self.stores))
        if name not in self.stores:
            raise NotFound(f"no datastore {name!r} here (datastores: {', '.join(self.stores)})")
        return name, self.stores[name]

    async def info(self) -> HostInfo:
        """What this host is and has."""
        facts = await asyncio.to_thread(host_facts)
        datastores = []
        for name, store in self.stores.items():
            sp = space(store.path)
            datastores.append(
                DatastoreInfo(name=name, path=str(store.path), total_bytes=sp.total, free_bytes=sp.free)
            )
        return HostInfo(
            name=self.config.name,
            version=__version__,
            accel=await self.accel(),
            address=self.config.host,
            site=self.config.site,
            datastores=datastores,
            memory_total=facts.memory.total,
            memory_available=facts.memory.available,
            cpu_model=facts.cpu.model,
            cpu_count=facts.cpu.count,
            qemu_version=list(await asyncio.to_thread(qemu_version, self.config.qemu)),
            vms=len(self.homes()),
            load_average=[round(x, 2) for x in os.getloadavg()],
        )

    # --- VMs ----------------------------------------------------------------------------------------------

    def homes(self) -> dict[str, tuple[str, VmHome]]:
        """Every VM home of every datastore, by VM name (the first datastore wins a duplicate)."""
        out: dict[str, tuple[str, VmHome]] = {}
        for ds, store in self.stores.items():
            for entry in store.entries():
                out.setdefault(entry.name, (ds, entry.home))
        return out

    def find(self, name: str) -> tuple[str, VmHome, VmSpec]:
        """A VM's datastore name, home and spec; :class:`NotFound` if it is not here."""
        found = self.homes().get(name)
        if found is None:
            raise NotFound(f"no VM named {name!r} on {self.config.name}")
        ds, home = found
        try:
            return ds, home, home.load_spec()
        except (OSError, VmError) as exc:
            raise Conflict(f"VM {name!r}: {exc}") from None

    async def vm(self, name: str) -> VmInfo:
        """One VM's state."""
        ds, home, spec = self.find(name)
        return await self._info(name, ds, home, spec, self.db.vms())

    async def vms(self) -> list[VmInfo]:
        """Every VM's state (a VM whose spec cannot be read is left out)."""
        remembered = self.db.vms()
        out: dict[str, VmInfo] = {}
        for ds, store in self.stores.items():
            for entry in store.entries():
                if entry.spec is not None and entry.name not in out:  # the first datastore wins
                    out[entry.name] = await self._info(entry.name, ds, entry.home, entry.spec, remembered)
        return [out[name] for name in sorted(out)]

    async def _info(
        self, name: str, ds: str, home: VmHome, spec: VmSpec, remembered: dict[str, dict[str, Any]]
    ) -> VmInfo:
        try:
            status = await control.vm_status(home, spec)
        except VmError as exc:
            status = {"running": home.is_running(), "state": "unknown", "error": str(exc)}
        row = remembered.get(name, {}).get("state")
        if row in (RowState.INCOMING, RowState.FENCED) and status.get("state") in (
            "running",
            "paused",
            "inmigrate",
        ):
            status = {**status, "state": row}  # the host's word: not to be run here
        return _vm_info(name, ds, home, spec, status)

    def protect(self, name: str, action: str) -> None:
        """Refuse ``action`` on a VM a migration owns here: one coming in, or one whose disks this host
        holds for the host it runs on (only that migration, or the next, may change it)."""
        row = self.db.vms().get(name, {})
        state = row.get("state")
        if state == RowState.INCOMING and action == "started" and _resumed(row):
            return  # committed here and resumed once: its QEMU died; starting it again is the way on
        if state == RowState.INCOMING:
            raise Conflict(f"VM {name!r} is coming in from another host: it cannot be {action} until its "
                           "migration ends")  # fmt: skip
        if state == RowState.SERVING:
            raise Conflict(f"VM {name!r} runs on another host; this host holds its disks: it cannot be "
                           f"{action} here (migrate it back instead)")  # fmt: skip

    @contextlib.contextmanager
    def busy(self, name: str) -> Any:
        """One operation on a VM at a time."""
        if name in self._busy:
            raise Conflict(f"VM {name!r} is busy with another request")
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

    async def create(self, body: VmCreate) -> VmInfo:
        """Create a VM (its home, disks and spec) in a datastore."""
        if body.name in self.homes() or body.name in self.db.vms():
            raise Conflict(f"a VM named {body.name!r} exists on {self.config.name} already")
        ds, store = self.datastore(body.datastore)
        policy = self.config.policy
        for what, value in (("image", body.image), ("kernel", body.kernel), ("initrd", body.initrd)):
            problem = policy.file_problem(Path(value), what) if value else None
            if problem:
                raise Problem(problem)  # before anything is read or made
        data = _spec_data(body)
        with self.busy(body.name):
            if body.guest:
                if body.guest not in WORKLOADS:
                    raise ValueError(f"no test-guest workload {body.guest!r} (known: {', '.join(WORKLOADS)})")
                if body.kernel or body.initrd or body.image:
                    raise ValueError(
                        "guest boots the test guest's kernel: no kernel, initrd or image with it"
                    )
                guest = await asyncio.to_thread(build_guest)
                params: dict[str, str | int] = dict(body.params)
                await asyncio.to_thread(
                    create_guest_vm, store, guest, data, body.guest, params, append=body.append or ""
                )
            else:
                if body.params:
                    raise ValueError("params go with guest")
                image = Path(body.image) if body.image else None
                spec = parse_spec(data)
                try:
                    await asyncio.to_thread(store.create_vm, spec, host_facts(), image=image)
                except OSError as exc:
                    # The host refused (a disk larger than its file system allows, ...): the request's fault.
                    raise Problem(f"cannot create VM {body.name!r}: {exc.strerror or exc}") from None
            if self.cluster is not None:
                # Owned here, under a name unique in the cluster: or not created at all.
                _ds, _home, spec = self.find(body.name)
                try:
                    await self.cluster.create(spec, str(store.uuid))
                except BaseException:
                    await asyncio.to_thread(store.destroy_vm, body.name)
                    raise
        info = await self.vm(body.name)
        self.db.set_vm(body.name, ds, info.uuid, RowState.CREATED)
        return info

    async def start(self, name: str) -> VmInfo:
        """Start a VM (its supervisor owns QEMU and the NBD service)."""
        ds, home, spec = self.find(name)
        self.protect(name, "started")
        row = self.db.vms().get(name, {})
        # An incoming VM started again past its commit keeps what its row says of the migration: the
        # source's job still asks this host for its relocations and ends it (found by the fault
        # campaign: B's QEMU killed at storage-post, started again, then "no VM coming in" for good).
        detail = str(row.get("detail") or "") if row.get("state") == RowState.INCOMING else ""
        problems = self.config.policy.spec_problems(spec, home.path)
        if problems:
            raise Problem("; ".join(problems))
        with self.busy(name):
            if self.cluster is not None:
                await self.cluster.ensure_owner(spec)  # owned here, by the current token
            qemu_pid = home.read_state().get("qemu_pid") if home.is_running() else None
            if detail and home.is_running() and not (isinstance(qemu_pid, int) and alive(qemu_pid)):
                # An incoming VM whose QEMU died: its supervisor ends a moment later (found by the fault
                # campaign: "running already" when started again right after B's QEMU was killed).
                await asyncio.to_thread(control.wait_stopped, home, 15.0)
            await asyncio.to_thread(
                control.start_vm,
                home,
                qemu=self.config.qemu if self.config.qemu != DEFAULT_QEMU else None,
                runtime_dir=self.config.runtime_dir,
                tls_dir=self.config.tls_dir,
            )
        self.db.set_vm(name, ds, str(spec.uuid), RowState.RUNNING, detail)
        return await self.vm(name)

    async def stop(self, name: str, body: VmStop) -> VmInfo:
        """Power a VM off (ACPI, then quit, then kill), or kill its supervisor (``force``)."""
        ds, home, spec = self.find(name)
        self.protect(name, "stopped")
        if not home.is_running():
            raise Conflict(f"VM {name!r} is not running")
        with self.busy(name):
            if body.force:
                await asyncio.to_thread(control.kill_vm, home)
            else:
                await control.stop_vm(home, spec, grace=body.timeout, hard=body.hard)
        self.db.set_vm(name, ds, str(spec.uuid), RowState.STOPPED)
        return await self.vm(name)

    def console(self, name: str, offset: int) -> tuple[bytes, int, bool]:
        """The console log from ``offset`` (at most 1 MiB), its size, and whether the VM runs."""
        _ds, home, _spec = self.find(name)
        try:
            with home.console_log.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(min(offset, size))
                return f.read(1 << 20), size, home.is_running()
        except FileNotFoundError:
            return b"", 0, home.is_running()

    async def destroy(self, name: str) -> None:
        """Delete a stopped VM with its disks."""
        ds, home, spec = self.find(name)
        self.protect(name, "destroyed")
        if home.is_running():
            raise Conflict(f"VM {name!r} is running: stop it first")
        with self.busy(name):
            await asyncio.to_thread(self.stores[ds].destroy_vm, name)
            if self.cluster is not None:
                await self.cluster.forget(spec)
        self.db.forget_vm(name)


def _spec_data(body: VmCreate) -> dict[str, Any]:
    """The spec ``body`` describes, as plain data (validated by :func:`parse_spec`)."""
    networks = [n for n in body.nics if n != "none"]
    if len(body.macs) > len(networks):
        raise ValueError(f"{len(body.macs)} MACs for {len(networks)} NICs")
    nics: list[dict[str, Any]] = [{"network": n} for n in networks]
    for nic, mac in zip(nics, body.macs, strict=False):
        nic["mac"] = mac
    disks = []
    for i, item in enumerate(body.disks):
        size, _, provisioning = item.partition(":")
        disks.append({"name": f"disk{i}", "size": size, "provisioning": provisioning or "thin"})
    if body.image and not disks:
        disks = [{"name": "disk0", "size": "512", "provisioning": "thin"}]  # grown to the image
    data: dict[str, Any] = {
        "name": body.name,
        "memory_mib": body.memory_mib,
        "cpus": body.cpus,
        "accel": body.accel,
        "disks": disks,
        "nics": nics,
    }
    if not body.guest:
        boot = {k: v for k, v in (("kernel", body.kernel), ("initrd", body.initrd)) if v}
        if body.append is not None:
            boot["append"] = body.append
        if boot:
            data["boot"] = boot
    return data


def _resumed(row: dict[str, Any]) -> bool:
    """Whether an incoming VM's row says it was resumed here (its migration committed to this host)."""
    try:
        return bool(json.loads(row.get("detail") or "{}").get("resumed"))
    except ValueError:
        return False
