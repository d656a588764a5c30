"""The agent API's request and response bodies (pydantic: validated in, documented in the OpenAPI
schema). Everything a client may send is bounded: names by the VM name rule, numbers by ranges."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hikkoshi.migrate.storage_modes import StorageMode

#: A VM or datastore name: what a directory of a datastore may be called.
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
#: A size or rate as the command line takes it: ``64M``, ``10G``, ``100Mbit``, ``4096``.
Amount = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?[A-Za-z]*$")]
#: A path on the agent's host.
HostPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatastoreInfo(BaseModel):
    """One datastore of the host."""

    name: str
    path: str
    total_bytes: int
    free_bytes: int


class HostInfo(BaseModel):
    """What an agent says about its host."""

    name: str
    version: str
    accel: str
    address: str
    """The address its services (NBD exports, migration streams) listen on."""
    site: str
    datastores: list[DatastoreInfo]
    memory_total: int
    memory_available: int
    cpu_model: str
    cpu_count: int
    qemu_version: list[int]
    vms: int
    load_average: list[float] = []
    """The host's 1, 5 and 15 minute load averages."""


class DiskInfo(BaseModel):
    """A VM's disk."""

    name: str
    size: int
    provisioning: str


class NicInfo(BaseModel):
    """A VM's NIC."""

    mac: str
    network: str


class VmInfo(BaseModel):
    """A VM as the agent sees it."""

    name: str
    datastore: str
    uuid: str | None = None
    running: bool
    state: str
    """``running``, ``paused``, ``stopped``, ``incoming``, ``migrated``, ... (the supervisor's word)."""
    memory_mib: int | None = None
    cpus: int | None = None
    disks: list[DiskInfo] = []
    nics: list[NicInfo] = []
    supervisor_pid: int | None = None
    qemu_pid: int | None = None
    accel: str | None = None
    error: str | None = None


class VmCreate(_Body):
    """``POST /v1/vms``: a new VM."""

    name: Name
    datastore: Name | None = None
    """Default: the agent's first datastore."""
    memory_mib: int = Field(ge=16, le=1 << 20)
    cpus: int = Field(default=1, ge=1, le=64)
    disks: list[Annotated[str, Field(max_length=40, pattern=r"^[0-9]+[A-Za-z]*(:(thin|thick))?$")]] = Field(
        default=[], max_length=16
    )
    """Sizes, e.g. ``64M`` or ``10G:thick``."""
    image: HostPath | None = None
    """Import this image (any qemu-img format) as the first disk."""
    kernel: HostPath | None = None
    initrd: HostPath | None = None
    append: Annotated[str, Field(max_length=4096)] | None = None
    guest: Annotated[str, Field(max_length=32)] | None = None
    """Boot the test guest into this workload (``diskwriter``, ``busy``, ...)."""
    params: dict[Annotated[str, Field(max_length=32)], Annotated[str, Field(max_length=256)]] = {}
    nics: list[Annotated[str, Field(max_length=64, pattern=r"^(user|none|bridge:[A-Za-z0-9_.-]{1,15})$")]] = (
        Field(default=["none"], max_length=8)
    )
    """``user``, ``bridge:NAME``, or ``none`` (no NIC)."""
    macs: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]] = Field(
        default=[], max_length=8
    )
    accel: Literal["auto", "kvm", "tcg"] = "auto"


class VmStop(_Body):
    """``POST /v1/vms/{name}/stop``."""

    hard: bool = False
    """Skip ACPI: quit QEMU at once."""
    force: bool = False
    """Kill the supervisor (when it does not answer)."""
    timeout: float = Field(default=60.0, ge=0, le=3600)


class MigrateBody(_Body):
    """``POST /v1/vms/{name}/migrate``: move the VM to another agent's host."""

    to: Annotated[
        str,
        Field(min_length=1, max_length=300, pattern=r"^(https://[^\s/]+(/.*)?|[A-Za-z0-9][A-Za-z0-9_.-]*)$"),
    ]
    """The destination agent's URL (HTTPS: it proves with its certificate that it is a host of the
    cluster before anything is sent), or (in a cluster) the destination host's name: its registered
    address is used, and its certificate must name that host."""
    to_host: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9][a-z0-9.-]*$")] | None = (
        None
    )
    """The host that must be there (its certificate's name); default: the URL's host name, or, for an
    address, whichever host of the cluster answers there (the record names it)."""
    datastore: Name | None = None
    """The destination datastore (default: its first)."""
    storage: StorageMode = StorageMode.HYBRID
    mode: Literal["live", "offline", "quick"] = "live"
    max_downtime_ms: int = Field(default=300, ge=10, le=60000)
    bandwidth: Amount | None = None
    """Memory stream limit, e.g. ``100Mbit``."""
    disk_bandwidth: Amount | None = None
    """Background disk copy limit (proxy modes)."""
    auto_converge: bool = True
    allow_postcopy: bool = False
    no_wait: bool = False
    """In a cluster: refuse (rather than queue) when a concurrency limit is reached."""


class StorageMigrateBody(_Body):
    """``POST /v1/vms/{name}/storage-migrate``: move the VM's home and disks to another datastore."""

    datastore: Name
    mode: Literal["mirror", "dbt"] = "mirror"
    bandwidth: Amount | None = None
    thick: bool = False


class MigrationInfo(BaseModel):
    """A migration as its agent knows it."""

    id: str
    vm: str
    kind: str
    role: str
    """``source`` (this agent runs it), or ``storage`` (within this host)."""
    phase: str
    storage: str
    running: bool
    """Whether a job of this agent works on it now."""
    created: float
    finished: float | None = None
    error: str | None = None
    progress: dict[str, Any] = {}
    """The latest progress (phase, bytes done and total, iteration, rates)."""
    report: dict[str, Any] = {}
    destination: str | None = None
    record: dict[str, Any] = {}
    """The whole record (phases with times, facts, settings)."""


class Accepted(BaseModel):
    """A job was started."""

    id: str


class Problem(BaseModel):
    """An error: what went wrong, for the person at the keyboard."""

    detail: str


# --- the destination side of a migration, for other agents --------------------------------------------


class IncomingFacts(BaseModel):
    """What the destination says before anything moves."""

    datastore: str
    datastore_path: str
    datastore_exists: bool
    home_exists: bool
    free_bytes: int
    accel: str
    qemu_version: list[int]
    hikkoshi_version: str
    facts: dict[str, Any]
    runtime_dir: str
    holds_vm: bool = False
    """This host holds the VM's disks (shared storage): the VM would come home."""
    uuid: str | None = None
    """The uuid of the VM of that name here, if there is one."""
    host: str = ""
    """This host's name."""


class IncomingDisks(_Body):
    """Sparse disk files for a mirror to fill, by file name."""

    sizes: dict[Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")], int]


class PullDisk(_Body):
    """One disk to pull: the source's read-only export, and the disk's size."""

    uri: Annotated[str, Field(min_length=8, max_length=300, pattern=r"^nbds?://[^\s]+$")]
    size: int = Field(ge=0, le=1 << 50)


class IncomingPull(_Body):
    """Cold migration: the disks to pull, by file name."""

    disks: dict[Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")], PullDisk]


MigrationId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


class IncomingStart(_Body):
    """Start the incoming supervisor (or take a VM whose disks are held here back)."""

    accel: Literal["kvm", "tcg"]
    migration: MigrationId
    source: Annotated[str, Field(max_length=300, pattern=r"^https://[^\s/]+(/.*)?$")] | None = None
    """The source's agent (to ask, after a crash, how the migration ended; its certificate must name
    the host that asked)."""


class StreamPrepare(_Body):
    """The incoming QEMU's side of the memory stream."""

    postcopy: bool = False
    tls: bool = True
    """Refused ``false`` unless the destination runs without TLS (``--insecure-loopback``)."""


class DiskListen(_Body):
    """Precopy: listen for the source's mirror."""

    migration: MigrationId
    tls: bool = True
    """Refused ``false`` unless the destination runs without TLS (``--insecure-loopback``)."""


class PeerHost(BaseModel):
    """What a host says about itself to the other hosts of its cluster."""

    name: str
    site: str
    version: str
    datastores: list[str]
    """Its datastores' names, the default first."""
    encrypts: bool
    """Whether it takes migrations over TLS only."""


class PeerMigration(BaseModel):
    """How a migration from this host to the asking one ended, as far as this host knows."""

    id: str
    phase: str
    committed: bool
    """The source committed: the VM runs at the destination."""


class PatienceBody(_Body):
    """How long a disk request waits for a lost source (``null``: as long as it takes)."""

    seconds: float | None = Field(default=None, ge=0, le=86400)


class ReleaseBody(_Body):
    """The migration after which a holder lets a VM's disks go."""

    migration: MigrationId


class ResumeBody(_Body):
    """Resume an incoming VM: the fencing token of its ownership here (a cluster's owner key)."""

    token: int | None = Field(default=None, ge=0)


class CommittedBody(_Body):
    """The migration (by id) committed to this host; in a cluster, with the owner key's token."""

    migration: MigrationId
    token: int | None = Field(default=None, ge=0)
