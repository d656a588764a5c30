"""A datastore: a directory holding one home directory per VM, and a marker file saying what it is.

``<path>/hikkoshi-datastore.toml`` marks the directory (its name and uuid, so a datastore seen
from another host or path is recognised); each VM lives in ``<path>/<name>/`` (see
:mod:`hikkoshi.vm.home`). Creating, listing, finding and destroying VMs, and reporting capacity,
happen here. Changes that must not race (names, MACs) hold an exclusive lock on the marker file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import tomli_w

from hikkoshi.vm import precheck
from hikkoshi.vm.disks import allocated_bytes, create_disk, image_info, import_image
from hikkoshi.vm.errors import DatastoreError, PrecheckError, RuntimeStateError, SpecError
from hikkoshi.vm.facts import HostFacts
from hikkoshi.vm.home import SPEC_FILE, VmHome, write_atomically
from hikkoshi.vm.host import space
from hikkoshi.vm.spec import SECTOR, VmSpec, spec_to_toml

MARKER = "hikkoshi-datastore.toml"
_FORMAT = 1


@dataclass(frozen=True)
class Capacity:
    """Space of a datastore, in bytes."""

    total: int
    """Size of the file system holding the datastore."""
    free: int
    """Free space on it (for unprivileged writers)."""
    provisioned: int
    """Sum of the sizes of all VM disks (thin disks may grow to this)."""
    allocated: int
    """Space the VM disks occupy now."""


@dataclass(frozen=True)
class VmEntry:
    """One VM directory as listed: its spec, or why it could not be read."""

    name: str
    home: VmHome
    spec: VmSpec | None
    error: str | None


class Datastore:
    """An opened datastore."""

    def __init__(self, path: Path, name: str, uuid: UUID) -> None:
        self.path = path
        self.name = name
        self.uuid = uuid

    def __repr__(self) -> str:
        return f"Datastore({str(self.path)!r}, name={self.name!r})"

    # --- opening ------------------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: Path, name: str | None = None) -> Datastore:
        """Make ``path`` (new or empty) a datastore."""
        path = path.expanduser().absolute()
        if (path / MARKER).exists():
            raise DatastoreError(f"{path} is a datastore already")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise DatastoreError(f"{path} exists and is not an empty directory")
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, name or path.name, uuid4())
        text = tomli_w.dumps({"format": _FORMAT, "name": store.name, "uuid": str(store.uuid)})
        write_atomically(path / MARKER, ("# hikkoshi datastore\n" + text).encode())
        return store

    @classmethod
    def open(cls, path: Path) -> Datastore:
        """Open an existing datastore; unknown paths are refused with a hint."""
        path = path.expanduser().absolute()
        if not path.is_dir():
            raise DatastoreError(f"unknown datastore {path}: no such directory")
        try:
            data = tomllib.loads((path / MARKER).read_text())
        except FileNotFoundError:
            raise DatastoreError(
                f"unknown datastore {path}: it has no {MARKER} (make it one with `hikkoshi datastore init`)"
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DatastoreError(f"datastore {path}: cannot read {MARKER}: {exc}") from None
        if data.get("format") != _FORMAT:
            raise DatastoreError(f"datastore {path}: unsupported format {data.get('format')!r}")
        try:
            return cls(path, str(data["name"]), UUID(str(data["uuid"])))
        except (KeyError, ValueError) as exc:
            raise DatastoreError(f"datastore {path}: damaged {MARKER} ({exc})") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.path / MARKER).open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- VMs ----------------------------------------------------------------------------------------------

    def home(self, name: str) -> VmHome:
        """The home of VM ``name`` (whether or not it exists)."""
        if "/" in name or name in ("", ".", ".."):
            raise DatastoreError(f"{name!r} is not a VM name")
        return VmHome(self.path / name)

    def entries(self) -> list[VmEntry]:
        """Every VM directory, sorted by name; unreadable specs are listed with their error."""
        out = []
        for child in sorted(self.path.iterdir()):
            # Hidden directories are not VMs (e.g. one being deleted).
            if child.name.startswith(".") or not (child / SPEC_FILE).is_file():
                continue
            home = VmHome(child)
            try:
                out.append(VmEntry(child.name, home, home.load_spec(), None))
            except SpecError as exc:
                out.append(VmEntry(child.name, home, None, str(exc)))
        return out

    def specs(self) -> list[VmSpec]:
        """The specs of all readable VMs."""
        return [e.spec for e in self.entries() if e.spec is not None]

    def lookup(self, name: str) -> tuple[VmHome, VmSpec]:
        """Home and spec of VM ``name``."""
        home = self.home(name)
        if not home.spec_file.is_file():
            known = ", ".join(e.name for e in self.entries()) or "none"
            raise DatastoreError(f"no VM named {name!r} in datastore {self.path} (VMs: {known})")
        spec = home.load_spec()
        if spec.name != name:
            raise DatastoreError(
                f"{home.spec_file} names the VM {spec.name!r}, but its directory is {name!r}"
            )
        return home, spec

    def create_vm(
        self,
        spec: VmSpec,
        facts: HostFacts,
        *,
        image: Path | None = None,
        image_format: str | None = None,
        populate: Callable[[VmHome], VmSpec] | None = None,
    ) -> VmHome:
        """Create the VM's home, its disks and ``vm.toml``; refuse what the host cannot hold.

        ``image`` is imported (qemu-img convert) into the first disk, which becomes as big as the
        image if the spec gave it less. ``populate`` may put files into the new home (e.g. a
        kernel) and return the spec to store. On any failure nothing is left behind.
        """
        if image is not None and not spec.disks:
            raise DatastoreError("an image needs a disk to go into")
        with self._locked():
            home = self.home(spec.name)
            if home.path.exists():
                raise DatastoreError(f"datastore {self.path} has a VM named {spec.name!r} already")
            problems = precheck.check_memory_total(spec, facts)
            problems += precheck.check_unique_macs(spec, self.specs())
            problems += precheck.check_thick_space(spec, space(self.path).free)
            problems += precheck.check_firmware(spec)
            if populate is None:
                problems += precheck.check_boot_files(spec, home.path)
            if problems:
                raise PrecheckError(problems, f"create VM {spec.name!r}")
            home.path.mkdir(mode=0o700)
            try:
                if populate is not None:
                    spec = populate(home)
                    problems = precheck.check_boot_files(spec, home.path)
                    if problems:
                        raise PrecheckError(problems, f"create VM {spec.name!r}")
                disks = list(spec.disks)
                if image is not None:
                    first = disks[0]
                    fmt, virtual = image_info(image, image_format)
                    size = max(first.size, -(-virtual // SECTOR) * SECTOR)
                    import_image(image, home.disk_path(first), size, first.provisioning, fmt)
                    disks[0] = first.model_copy(update={"size": size})
                    spec = spec.model_copy(update={"disks": tuple(disks)})
                for disk in disks[1 if image is not None else 0 :]:
                    create_disk(home.disk_path(disk), disk.size, disk.provisioning)
                # Written last: a directory without vm.toml is not a VM.
                write_atomically(home.spec_file, spec_to_toml(spec).encode(), 0o600)
            except BaseException:
                shutil.rmtree(home.path, ignore_errors=True)
                raise
        return home

    def destroy_vm(self, name: str) -> None:
        """Delete a stopped VM's home with its disks."""
        home, _spec = self.lookup(name)
        with self._locked(), home.locked() as free:
            if not free:
                raise RuntimeStateError(f"VM {name!r} is running; stop it first")
            # Rename first, so that a crash halfway never leaves a half-deleted VM that looks whole.
            doomed = self.path / f".deleting-{name}-{os.getpid()}"
            os.rename(home.path, doomed)
        shutil.rmtree(doomed)

    # --- space --------------------------------------------------------------------------------------------

    def capacity(self) -> Capacity:
        """Capacity and free space of the file system, and what the VM disks take and may take."""
        fs = space(self.path)
        provisioned = allocated = 0
        for entry in self.entries():
            if entry.spec is None:
                continue
            for disk in entry.spec.disks:
                provisioned += disk.size
                with contextlib.suppress(OSError):
                    allocated += allocated_bytes(entry.home.disk_path(disk))
        return Capacity(total=fs.total, free=fs.free, provisioned=provisioned, allocated=allocated)
