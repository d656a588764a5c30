"""The VM spec: what a VM is, independent of where it runs. Stored as ``vm.toml`` in its home.

A spec names the VM (name, uuid), its hardware (memory, vCPUs, CPU model, machine type, firmware),
its disks (raw files in the home directory, each served to QEMU as an NBD export named after the
disk), its NICs (each with a stable MAC: the guest's network identity, which a migration keeps)
and how it boots (from a disk through the firmware, or a kernel given directly).

Validation is pydantic's; :func:`parse_spec` turns its errors into :class:`SpecError`, one readable
line per problem (``disks[1].size: ...``). Checks that need the host or the datastore (files exist,
memory fits, MACs are unique) live in :mod:`hikkoshi.vm.precheck`.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from uuid import UUID, uuid4

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from hikkoshi.vm.errors import SpecError

SPEC_FORMAT: Literal[1] = 1
SECTOR = 512
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``64M``, ``1G``, ``512MiB``, ``4096`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like 64M")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size (examples: 64M, 10G, 512MiB, 1048576)")
        return int(m[1]) << _SIZE_UNITS[m[2].lower()]
    raise ValueError("a size is a number of bytes or a string like 64M")


def format_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it readable (``64 MiB``, ``1.5 GiB``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _check_disk_size(size: int) -> int:
    if size <= 0:
        raise ValueError("must be more than 0 bytes")
    if size % SECTOR:
        raise ValueError(f"must be a multiple of {SECTOR} bytes, got {size}")
    if size > 1 << 50:
        raise ValueError("is more than 1 PiB")
    return size


def normalize_mac(value: object) -> str:
    """A unicast MAC address in lower case with colons; accepts ``-`` as the separator too."""
    if not isinstance(value, str):
        raise ValueError("a MAC address is a string like 52:54:00:12:34:56")
    text = value.strip().lower().replace("-", ":")
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", text):
        raise ValueError(f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    first = int(text[:2], 16)
    if first & 1:
        raise ValueError(f"{text} is a multicast address; a NIC needs a unicast one")
    if text == "00:00:00:00:00:00":
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    return text


def generate_mac() -> str:
    """A random MAC in ``52:54:00:xx:xx:xx``: QEMU's customary prefix, locally administered."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _check_network(value: str) -> str:
    if value == "user":
        return value
    kind, sep, bridge = value.partition(":")
    valid_name = re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge) and bridge not in (".", "..")
    if kind == "bridge" and sep and valid_name:
        return value
    raise ValueError(f"{value!r} is not a network: use 'user' or 'bridge:NAME' (an existing Linux bridge)")


def _check_boot_path(value: Path) -> Path:
    if not str(value):
        raise ValueError("is empty")
    if not value.is_absolute() and ".." in PurePosixPath(value).parts:
        raise ValueError(f"{value}: a relative path (inside the VM's home) may not contain '..'")
    return value


def _check_append(value: str) -> str:
    if "\n" in value or "\0" in value:
        raise ValueError("the kernel command line must be one line")
    return value


def _matching(pattern: str, rule: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value!r} is not allowed: {rule}")
        return value

    return AfterValidator(check)


Size = Annotated[int, BeforeValidator(parse_size), AfterValidator(_check_disk_size)]
Mac = Annotated[str, BeforeValidator(normalize_mac)]
# A VM's name is also its home directory's name.
VmName = Annotated[
    str,
    _matching(
        r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}",
        "up to 63 letters, digits, '_', '.', '-', starting with a letter or digit",
    ),
]
# A disk's name is also its file name, its NBD export name, and part of QEMU node names and the
# virtio serial (20 bytes at most).
DiskName = Annotated[
    str,
    _matching(r"[a-z][a-z0-9_-]{0,19}", "up to 20 lower-case letters, digits, '_', '-'; a letter first"),
]
Network = Annotated[str, AfterValidator(_check_network)]
BootPath = Annotated[Path, AfterValidator(_check_boot_path)]
# Passed to QEMU as one argument each; no commas in a machine type, which would start further
# options; a CPU model may carry features (qemu64,+ssse3).
MachineType = Annotated[
    str, _matching(r"[A-Za-z0-9_.-]{1,64}", "a QEMU machine type such as q35 or pc-q35-7.2")
]
CpuModel = Annotated[
    str,
    _matching(r"[A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.=+-]{1,64})*", "a QEMU CPU model such as qemu64 or host"),
]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DiskSpec(_Model):
    """One disk: a raw file ``<name>.raw`` in the VM's home, the NBD export ``<name>``."""

    name: DiskName
    size: Size
    provisioning: Literal["thin", "thick"] = "thin"
    """thin: a sparse file; thick: every block allocated when the disk is created."""
    bus: Literal["virtio"] = "virtio"

    @property
    def file_name(self) -> str:
        """The disk's file name in the VM's home."""
        return f"{self.name}.raw"


class PortForward(_Model):
    """A host port forwarded into the guest (user-mode networking only)."""

    protocol: Literal["tcp", "udp"] = "tcp"
    host_address: IPv4Address = IPv4Address("127.0.0.1")
    """Where the host listens: loopback unless asked otherwise."""
    host_port: Port
    guest_port: Port


class NicSpec(_Model):
    """One virtio NIC."""

    mac: Mac = Field(default_factory=generate_mac)
    network: Network = "user"
    """``user`` (QEMU's user-mode network, no privileges needed) or ``bridge:NAME`` (a tap on it)."""
    forwards: tuple[PortForward, ...] = ()

    @model_validator(mode="after")
    def _forwards_need_user_network(self) -> NicSpec:
        if self.forwards and self.network != "user":
            raise ValueError("port forwards work with the user network only; a bridged guest is reachable")
        return self

    @property
    def bridge(self) -> str | None:
        """The bridge's name for ``bridge:NAME``, else ``None``."""
        return self.network.partition(":")[2] if self.network.startswith("bridge:") else None


class BootSpec(_Model):
    """Boot from a disk (through the firmware), or from a kernel given directly.

    Relative paths are inside the VM's home (they travel with it); absolute ones refer to the host.
    """

    disk: DiskName | None = None
    kernel: BootPath | None = None
    initrd: BootPath | None = None
    append: Annotated[str, AfterValidator(_check_append)] = ""

    @model_validator(mode="after")
    def _one_way(self) -> BootSpec:
        if self.kernel is not None and self.disk is not None:
            raise ValueError("boot from a disk or from a kernel, not both")
        if self.kernel is None and (self.initrd is not None or self.append):
            raise ValueError("initrd and append need a kernel")
        return self


class VmSpec(_Model):
    """A whole VM."""

    format: Literal[1] = SPEC_FORMAT
    name: VmName
    uuid: UUID = Field(default_factory=uuid4)
    memory_mib: int = Field(ge=16, le=1 << 24)
    cpus: int = Field(default=1, ge=1, le=255)
    cpu_model: CpuModel | None = None
    """QEMU ``-cpu`` model; default ``host`` under KVM and ``qemu64`` under TCG. Name a model that
    every host of a migration supports when they differ."""
    machine: MachineType = "q35"
    firmware: Literal["bios", "uefi"] = "bios"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    on_reboot: Literal["restart", "poweroff"] = "restart"
    """What a guest reboot does; ``poweroff`` ends the VM instead (test guests: a reboot is a panic)."""
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    boot: BootSpec = BootSpec()

    @model_validator(mode="after")
    def _consistent(self) -> VmSpec:
        problems = []
        names = [d.name for d in self.disks]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"disk name {name!r} is used twice")
        macs = [n.mac for n in self.nics]
        for mac in sorted({m for m in macs if macs.count(m) > 1}):
            problems.append(f"MAC {mac} is used by two NICs")
        if self.boot.disk is not None and self.boot.disk not in names:
            known = ", ".join(names) or "none"
            problems.append(f"boot disk {self.boot.disk!r} is not one of the disks ({known})")
        if self.boot.kernel is None and self.boot.disk is None and not self.disks:
            problems.append("nothing to boot: give a kernel or a disk")
        if problems:
            raise ValueError("\n".join(problems))  # split into one line each by format_validation_error
        return self

    @property
    def boot_disk(self) -> str | None:
        """The disk the firmware boots from (the first disk unless a kernel is given or one named)."""
        if self.boot.kernel is not None:
            return None
        return self.boot.disk or (self.disks[0].name if self.disks else None)


# --- reading and writing ---------------------------------------------------------------------------------


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "function-plain"):
            continue
        elif part.startswith("function-") or "[" in part:
            continue  # pydantic's names for validator steps, not fields
        else:
            out += f".{part}" if out else part
    return out


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a setting of a VM spec (misspelt?)"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind.startswith(("literal", "greater", "less", "int_", "uuid", "ip_")):
        shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
        return f"{msg[0].lower()}{msg[1:]} (got {shown})"
    return msg


def format_validation_error(exc: ValidationError) -> list[str]:
    """One readable line per problem pydantic found: ``where: what`` (just ``what`` for the whole)."""
    lines = []
    for error in exc.errors():
        where = _location(tuple(error["loc"]))
        for what in _message(error).splitlines():
            lines.append(f"{where}: {what}" if where else what)
    return lines


def parse_spec(data: Mapping[str, Any], source: str | None = None) -> VmSpec:
    """Validate a spec given as plain data (from TOML or built by a tool); raise :class:`SpecError`."""
    try:
        return VmSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc), source) from None


def spec_to_toml(spec: VmSpec) -> str:
    """The TOML text of ``spec``: settings first, then ``[boot]``, ``[[disks]]``, ``[[nics]]``."""
    data = spec.model_dump(mode="json", exclude_none=True)
    if not data["boot"]:
        del data["boot"]
    header = f"# hikkoshi VM spec (format {SPEC_FORMAT})\n"
    return header + tomli_w.dumps(data)


def spec_from_toml(text: str, source: str | None = None) -> VmSpec:
    """Parse and validate the TOML text of a spec."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([f"not valid TOML: {exc}"], source) from None
    return parse_spec(data, source)


def load_spec(path: Path) -> VmSpec:
    """Read ``vm.toml``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"cannot read it: {exc.strerror or exc}"], str(path)) from None
    return spec_from_toml(text, str(path))
