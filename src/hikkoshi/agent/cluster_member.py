"""This agent as a member of an etcd cluster (``hikkoshi agent --etcd ...``).

While it runs the host is registered under a lease (renewed every few seconds; a host whose lease
lapsed is listed ``down``) with what it is and how it is doing, and the states of the VMs it runs. It
owns VMs through their owner keys (:mod:`hikkoshi.cluster.ownership`): a VM is created here only with a
new owner key, and started or resumed here only if the key names this host with the token this agent
holds. A host cut off from etcd keeps its running VMs running but starts, resumes and accepts nothing
until etcd answers again (:meth:`ClusterMember.need_online`).

Migrations from this host are cluster jobs: recorded in etcd with their phase under a lease of the
coordinating agent, holding slots of the limited resources they use (queued while a limit is reached),
and committed by moving the VM's owner key to the destination in the same transaction that records the
commit (:class:`ClusterLedger`); the destination checks that token before it lets the guest run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from hikkoshi.agent.drs_service import DrsService
from hikkoshi.agent.errors import Conflict, Problem
from hikkoshi.agent.host import Host
from hikkoshi.agent.load_sampler import LoadSampler
from hikkoshi.agent.vm_rows import RowState
from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import ClusterError, EtcdUnavailable, NameTaken, OwnedElsewhere
from hikkoshi.cluster.hosts import Registration, RegistrationState, register_host
from hikkoshi.cluster.jobs import Coordination
from hikkoshi.cluster.jobs import Jobs as ClusterJobs
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.limits import Slots
from hikkoshi.cluster.models import DatastoreInfo, HostInfo, HostLoad, HostStatus, VmRecord
from hikkoshi.cluster.ownership import Claim, Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.cluster.tasks import background
from hikkoshi.migrate.phases import Phase, PhaseError, committed
from hikkoshi.migrate.record import MigrationRecord
from hikkoshi.migrate.sides import SideError
from hikkoshi.vm.facts import parse_meminfo
from hikkoshi.vm.host import host_facts, space
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.agent.cluster")


class ClusterUnavailable(Problem):
    """etcd does not answer: this host starts, resumes and accepts nothing until it does."""

    status = 503


def unavailable(what: str, exc: Exception) -> ClusterUnavailable:
    """The error of an operation refused because etcd did not answer."""
    return ClusterUnavailable(f"etcd does not answer this host ({exc}): it {what} nothing until it does")


@dataclass
class ClusterSettings:
    """How the agent reaches etcd."""

    etcd: EtcdConfig
    lease_ttl: int = 6
    takeover_after: float = 60.0
    """How long a migration's source host must be down before this host, its destination, settles it."""
    vm_memory: int = 0
    """Bytes of memory VMs may be given here, as DRS counts it (0: all of the host's)."""
    vm_cpus: int = 0
    """Cores VMs may use here, as DRS counts them (0: all of the host's)."""
    load_interval: float = 10.0
    """Seconds between load samples of the VMs (published with the host's status)."""
    load_window: int = 30
    """Samples kept (the window DRS looks at)."""
    datastore_capacity: dict[str, int] = field(default_factory=dict)
    """Datastore name -> the bytes DRS counts of it (a share of a file system others use too): its
    capacity, and its free space that less what its files take."""
    drs_tick: float = 1.0
    """Seconds between looks at due scheduled migrations and the automatic planner."""


def vm_record(spec: VmSpec, datastore_uuid: str | None) -> VmRecord:
    """What the cluster keeps of a VM (placement's needs; the spec stays in its home)."""
    return VmRecord(
        uuid=str(spec.uuid),
        name=spec.name,
        memory=spec.memory_mib << 20,
        vcpus=spec.cpus,
        disk_bytes=sum(d.size for d in spec.disks),
        datastore=datastore_uuid,
    )


def usable_size(path: Path) -> int:
    """What the file system holding ``path`` gives us: used plus available, as ``df`` counts (blocks
    reserved for root, or a thin volume's missing space, are neither; counting them would make a
    half-full file system look full to Storage DRS and placement)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree + st.f_bavail) * st.f_frsize


def allocated_under(path: Path) -> int:
    """Bytes the files under ``path`` take on disk."""
    used = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                used += os.lstat(os.path.join(root, f)).st_blocks * 512
    return used


class ClusterMember:
    """See the module's docstring."""

    def __init__(self, settings: ClusterSettings, host: Host) -> None:
        self.settings = settings
        self.host = host
        self.keys = Keys()
        self.store: Store | None = None
        self.registration: Registration | None = None
        self.claims: dict[str, Claim] = {}
        """VM uuid -> this host's ownership of it (the token it starts and resumes with)."""
        self.migrations_out = 0
        self.migrations_in = 0
        self.sampler = LoadSampler(host, settings.load_interval, settings.load_window)

    # --- membership ----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def joined(self) -> AsyncIterator[ClusterMember]:
        """Registered for the block's length; :class:`EtcdUnavailable` at once if etcd does not answer."""
        async with Store(self.settings.etcd) as store, background(self.sampler.run(), "load-sampler"):
            self.store = store
            async with register_host(store, self._info(), self._status, ttl=self.settings.lease_ttl) as reg:
                self.registration = reg
                log.info("registered in the cluster at %s", ", ".join(self.settings.etcd.endpoints))
                try:
                    async with background(DrsService(self).run(), "drs"):
                        yield self
                finally:
                    self.registration = None
                    self.store = None

    @property
    def online(self) -> bool:
        """Whether etcd answers this host now (its registration holds)."""
        reg = self.registration
        return reg is not None and reg.state == RegistrationState.REGISTERED

    def need_online(self, what: str) -> Store:
        """The store, if this host may act on the cluster's word now; else :class:`ClusterUnavailable`."""
        if self.store is None or not self.online:
            raise ClusterUnavailable(f"etcd does not answer this host: it {what} nothing until it does")
        return self.store

    def _info(self) -> HostInfo:
        config = self.host.config
        facts = host_facts()
        return HostInfo(
            name=config.name,
            api_address=config.url,
            migration_addresses=(config.migration_address,),
            site=config.site,
            cpu_model=facts.cpu.model,
            memory_total=facts.memory.total,
            datastores=tuple(
                DatastoreInfo(name=name, uuid=str(store.uuid), capacity=self._capacity(name, store.path))
                for name, store in self.host.stores.items()
            ),
        )

    def _status(self) -> HostStatus:
        vms = self._vm_states()
        with open("/proc/meminfo") as f:
            memory = parse_meminfo(f.read())
        try:
            load1 = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
        except OSError:
            load1 = 0.0
        return HostStatus(
            memory_free=memory.available,
            datastores_free={str(s.uuid): self._free(n, s.path) for n, s in self.host.stores.items()},
            load=HostLoad(
                cpu=min(1.0, load1),
                vms=sum(1 for state in vms.values() if state == RowState.RUNNING),
                migrations_out=self.migrations_out,
                migrations_in=self.migrations_in,
            ),
            vms=vms,
            cpu_cores=self.settings.vm_cpus or os.cpu_count() or 1,
            vm_memory=self.settings.vm_memory,
            vm_loads=self.sampler.loads(),
            datastore_latency_p90=self.sampler.latency.windows(),
            sample_interval=self.settings.load_interval,
        )

    def _capacity(self, name: str, path: Path) -> int:
        total = usable_size(path)
        cap = self.settings.datastore_capacity.get(name)
        return total if cap is None else min(cap, total)

    def _free(self, name: str, path: Path) -> int:
        free = space(path).free
        cap = self.settings.datastore_capacity.get(name)
        return free if cap is None else max(0, min(free, cap - allocated_under(path)))

    def _vm_states(self) -> dict[str, str]:
        """uuid -> state of every VM in this host's datastores that the cluster may know."""
        rows = self.host.db.vms()
        out: dict[str, str] = {}
        for name, (_ds, home) in self.host.homes().items():
            row = rows.get(name, {})
            uuid, state = row.get("uuid"), row.get("state")
            if not uuid:
                continue
            if state not in (RowState.INCOMING, RowState.SERVING, RowState.FENCED):
                state = RowState.RUNNING if home.is_running() else RowState.STOPPED
            out[str(uuid)] = str(state)
        return out

    # --- ownership -----------------------------------------------------------------------------------------

    def _own(self) -> Ownership:
        return Ownership(self.need_online("changes"), self.keys)

    async def create(self, spec: VmSpec, datastore_uuid: str | None) -> Claim:
        """A new VM owned here: its owner key and its cluster-wide unique name, in one transaction."""
        try:
            claim = await self._own().create_vm(vm_record(spec, datastore_uuid), self.host.config.name)
        except NameTaken as exc:
            raise Conflict(f"a VM named {spec.name!r} exists in the cluster already ({exc})") from None
        except OwnedElsewhere as exc:
            raise Conflict(f"VM {spec.name!r} is owned by host {exc.holder!r}") from None
        except EtcdUnavailable as exc:
            raise unavailable("creates", exc) from None
        self.claims[claim.uuid] = claim
        return claim

    async def ensure_owner(self, spec: VmSpec) -> Claim:
        """This host owns the VM now (the key names it): the claim to start or resume it with.

        A VM that the cluster does not know yet (made before the host joined) is claimed here."""
        own, uuid, name = self._own(), str(spec.uuid), self.host.config.name
        try:
            current = await own.owner(uuid)
            if current is None:
                await own.create_vm(vm_record(spec, None), name)
                current = await own.owner(uuid)
            if current is None or current.host != name:
                holder = current.host if current else "nobody"
                raise Conflict(f"VM {spec.name!r} is owned by host {holder!r}, not this one: start it there")
            check = await own.check_owner(uuid, name, current.token)
        except EtcdUnavailable as exc:
            raise unavailable("starts", exc) from None
        except (NameTaken, OwnedElsewhere) as exc:
            raise Conflict(f"VM {spec.name!r}: {exc}") from None
        if not check.ok:
            raise Conflict(f"VM {spec.name!r} is owned by host {check.holder!r}, not this one")
        self.claims[uuid] = current
        return current

    async def check_token(self, spec: VmSpec, token: int | None) -> Claim:
        """Before an incoming VM runs here: the owner key names this host with ``token``."""
        if token is None:
            raise Conflict("this host is in a cluster: a migration resumes a VM only with its owner token")
        own, uuid, name = self._own(), str(spec.uuid), self.host.config.name
        try:
            check = await own.check_owner(uuid, name, token)
        except EtcdUnavailable as exc:
            raise unavailable("resumes", exc) from None
        if not check.ok:
            raise Conflict(f"VM {spec.name!r}: the owner key names {check.holder!r} (token {check.token})")
        claim = Claim(uuid, name, token)
        self.claims[uuid] = claim
        return claim

    async def forget(self, spec: VmSpec) -> None:
        """The VM is destroyed here: its owner key and name go."""
        own = self._own()
        claim = self.claims.pop(str(spec.uuid), None) or await own.owner(str(spec.uuid))
        if claim is not None and claim.host == self.host.config.name:
            try:
                await own.remove_vm(claim)
            except ClusterError as exc:
                log.warning("VM %s: its owner key stays: %s", spec.name, exc)

    # --- migrations ----------------------------------------------------------------------------------------

    def jobs(self) -> ClusterJobs:
        """The cluster's migration records."""
        return ClusterJobs(self.need_online("starts"), self.keys)

    def slots(self) -> Slots:
        """The cluster's concurrency limits."""
        return Slots(self.need_online("starts"), self.keys)

    async def resolve(self, host: str) -> HostInfo:
        """A cluster host by name (its API address and site)."""
        from hikkoshi.cluster.hosts import list_hosts

        store = self.need_online("migrates")
        for view in await list_hosts(store, self.keys):
            if view.info.name == host:
                if view.status is None:
                    raise Problem(f"host {host!r} is down (its lease lapsed)")
                return view.info
        raise Problem(f"no host named {host!r} in the cluster")


class ClusterLedger:
    """The commit of one migration in the cluster (see :mod:`hikkoshi.migrate.ledger`): the owner key
    moves to the destination with the record's commit, in one transaction.

    ``coordination`` is ``None`` when this agent could not become the job's coordinator (the cluster
    record is gone or another host settled it): then the ledger only reads, and a commit that is not
    in etcd already is refused."""

    def __init__(self, member: ClusterMember, coordination: Coordination | None, claim: Claim) -> None:
        self.member = member
        self.coordination = coordination
        self.claim = claim
        self.moved: Claim | None = None

    def _ownership(self, what: str) -> Ownership:
        return Ownership(self.member.need_online(what), self.member.keys)

    async def prepare(self, record: MigrationRecord) -> None:
        try:
            if self.coordination is None:
                raise Problem("this agent does not coordinate the migration in the cluster")
            self.coordination.lease.check()
            check = await self._ownership("commits").check_owner(
                self.claim.uuid, self.claim.host, self.claim.token
            )
        except (ClusterError, Problem) as exc:
            raise SideError(f"the cluster cannot take the commit now: {exc}") from None
        if not check.ok:
            raise SideError(f"the owner key moved since the migration began (now {check.holder!r})")

    async def record_commit(self, record: MigrationRecord) -> int | None:
        try:
            return await self._record_commit(record)
        except OwnedElsewhere as exc:
            raise SideError(f"the owner key moved to {exc.holder!r}: the commit cannot be recorded") from None
        except (ClusterError, Problem) as exc:
            # After the supervisor's commit: the job waits for etcd and goes on, never back.
            raise SideError(f"the commit is not in etcd yet: {exc}", transient=True) from None

    async def _record_commit(self, record: MigrationRecord) -> int | None:
        if self.moved is not None:
            return self.moved.token
        current = await self._ownership("commits").owner(self.claim.uuid)
        if current is not None and current.host == record.destination.host:
            self.moved = current  # moved before (a repeated step, or by the destination's agent)
            return current.token
        if self.coordination is None:
            raise OwnedElsewhere(self.claim.uuid, current.host if current else None, 0)
        jobs = self.member.jobs()
        for attempt in range(5):
            try:
                phase = record.phase if committed(record.phase) else Phase.RESUME
                self.moved = await jobs.commit(self.coordination, self.claim, phase)
                return self.moved.token
            except PhaseError:  # settled (rolled back) by another host while this one was away
                raise OwnedElsewhere(self.claim.uuid, current.host if current else None, 0) from None
            except EtcdUnavailable:
                if attempt == 4:
                    raise
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def is_committed(self, record: MigrationRecord) -> bool:
        try:
            current = await self._ownership("reads").owner(self.claim.uuid)
        except (ClusterError, Problem):
            return False
        return current is not None and current.host == record.destination.host
