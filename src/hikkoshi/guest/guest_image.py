"""A minimal Linux guest for tests and demos: Debian's kernel, busybox and a generated initramfs.

:func:`build_guest` downloads (never installs) ``linux-image-amd64``'s real kernel package and
``busybox-static`` with ``apt-get download``, unpacks them with ``dpkg-deb -x`` into a scratch
directory in the cache, and writes the kernel (the uncompressed PVH-bootable ``vmlinux`` taken out
of the bzImage, see :func:`pvh_vmlinux`) plus a gzip-compressed newc initramfs holding busybox, the
virtio kernel modules (dependencies first) and the scripts of :mod:`hikkoshi.guest.workloads`. The
result lives in ``<cache>/guest-<release>-<key>/``, where the key hashes the package versions, the
module list, the init and workload scripts and the cpio writer, so a change to any of them builds a
new image while an unchanged one is reused at once.

:func:`qemu_command` turns a :class:`GuestImage` into a QEMU command line running one workload,
under KVM when KVM really runs guests here (see :func:`hikkoshi.vm.accel.detect_accel`), otherwise
under TCG.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hikkoshi.guest import cpio
from hikkoshi.guest.workloads import GUEST_FILES, INIT_SCRIPT, WORKLOADS
from hikkoshi.vm.accel import DEFAULT_QEMU, Accel, detect_accel

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DEFAULT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
"""Modules loaded at boot (their dependencies are added): PCI transport, disks and network, and
the ACPI power button with its event device, so that ``system_powerdown`` stops the guest cleanly."""

_LAYOUT_VERSION = 1  # bump when the image layout changes in a way the key would not notice
_STALE_SECONDS = 7 * 24 * 3600


class GuestImageError(RuntimeError):
    """The guest image could not be built (missing tools, packages, files)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs, and what went into them."""

    kernel: Path
    initrd: Path
    kernel_release: str
    """``uname -r`` of the guest kernel, e.g. ``6.1.0-56-amd64``."""
    packages: Mapping[str, str]
    """Debian package name to the version used."""
    modules: tuple[str, ...]
    """Kernel modules in the initramfs, in load order."""
    key: str
    """Content hash naming this build in the cache."""

    @property
    def directory(self) -> Path:
        """The cache directory holding this build."""
        return self.kernel.parent

    @property
    def cache_dir(self) -> Path:
        """The cache root this build lives in."""
        return self.kernel.parent.parent


def default_cache_dir() -> Path:
    """``$HIKKOSHI_CACHE`` if set, else ``~/.cache/hikkoshi/guest``."""
    env = os.environ.get("HIKKOSHI_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "hikkoshi" / "guest"


def build_guest(cache_dir: Path | None = None, *, modules: Sequence[str] = DEFAULT_MODULES) -> GuestImage:
    """Build the guest image into ``cache_dir`` (see :func:`default_cache_dir`), or reuse it.

    Needs ``apt-get``/``apt-cache`` with a current package index and ``dpkg-deb``; downloads about
    70 MB the first time. Safe to call from several processes at once (a lock file serialises
    builds).
    """
    cache = (cache_dir or default_cache_dir()).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    packages = _resolve_packages(cache)
    key = _cache_key(packages, modules)

    found = _load_built(cache, key)
    if found is not None:
        return found
    with _locked(cache / ".lock"):
        found = _load_built(cache, key)  # another process may have built it while we waited
        if found is not None:
            return found
        debs = [_download(cache / "debs", name, version) for name, version in packages.items()]
        image = _build(cache, key, packages, debs, modules)
        _prune(cache, image, debs)
        return image


# --- package resolution and download --------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestImageError(
            f"{cmd[0]} not found: the guest image needs Debian's apt and dpkg tools"
        ) from exc
    if proc.returncode != 0:
        raise GuestImageError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _apt_lists_stamp() -> str:
    """Changes whenever ``apt-get update`` changes what apt would pick."""
    h = hashlib.sha256()
    paths = [*Path("/var/lib/apt/lists").glob("*"), Path("/var/lib/dpkg/status")]
    paths += [Path("/etc/apt/preferences"), *Path("/etc/apt/preferences.d").glob("*")]  # pinning
    for path in sorted(paths):
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve_packages(cache: Path) -> dict[str, str]:
    """Package name -> candidate version for the real kernel package and busybox.

    apt-cache takes over a second per call here, so the answer is remembered in the cache until
    the apt package lists change.
    """
    memo_file = cache / "packages.json"
    stamp = _apt_lists_stamp()
    try:
        memo = json.loads(memo_file.read_text())
        if memo["stamp"] == stamp:
            return {str(k): str(v) for k, v in memo["packages"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", KERNEL_METAPACKAGE])
    # The metapackage depends on exactly one versioned image, e.g. linux-image-6.1.0-56-amd64.
    found = re.findall(r"^\s*\|?Depends:\s*(linux-image-\d\S*-amd64)\s*$", out, re.MULTILINE)
    if not found:
        raise GuestImageError(f"{KERNEL_METAPACKAGE} depends on no linux-image-*-amd64:\n{out}")
    names = [str(found[0]), BUSYBOX_PACKAGE]
    out = _run(["apt-cache", "policy", *names])
    # Output: for each package a line "name:", then indented "Installed:", "Candidate:", ...
    candidates: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current is not None and line.strip().startswith("Candidate:"):
            candidates[current] = line.split(":", 1)[1].strip()
    packages = {}
    for name in names:
        version = candidates.get(name)
        if version is None or version == "(none)":
            raise GuestImageError(f"no installable version of {name} (run apt-get update?)")
        packages[name] = version
    tmp = memo_file.with_name(f".packages.{os.getpid()}.json")
    tmp.write_text(json.dumps({"stamp": stamp, "packages": packages}, indent=2) + "\n")
    os.replace(tmp, memo_file)
    return packages


def _deb_name(package: str, version: str) -> str:
    # apt writes the epoch's colon as %3a; do the same so names stay portable.
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def _download(debs_dir: Path, package: str, version: str) -> Path:
    """``apt-get download package=version`` into ``debs_dir`` unless already there."""
    target = debs_dir / _deb_name(package, version)
    if target.exists():
        return target
    debs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".download-") as tmp:
        cmd = ["apt-get", "download", "-q", f"{package}={version}"]
        if os.geteuid() == 0:
            # As root apt drops to the _apt user, who cannot write to our cache: warns, then works.
            cmd[2:2] = ["-o", "APT::Sandbox::User=root"]
        _run(cmd, cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestImageError(f"apt-get download {package}={version} produced {got}")
        os.replace(got[0], target)
    return target


# --- building -------------------------------------------------------------------------------------------


def _cache_key(packages: Mapping[str, str], modules: Sequence[str]) -> str:
    h = hashlib.sha256()
    parts: dict[str, object] = {
        "layout": _LAYOUT_VERSION,
        "packages": dict(sorted(packages.items())),
        "modules": list(modules),
        "init": INIT_SCRIPT,
        "files": dict(sorted(GUEST_FILES.items())),
        "workloads": {
            name: {"script": w.script, "files": dict(sorted(w.files.items()))}
            for name, w in sorted(WORKLOADS.items())
        },
        # The archive bytes depend on the writer too (so even reformatting it rebuilds: cheap).
        "cpio": Path(cpio.__file__).read_text(),
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _load_built(cache: Path, key: str) -> GuestImage | None:
    for manifest in cache.glob(f"guest-*-{key}/manifest.json"):
        try:
            data = json.loads(manifest.read_text())
            image = GuestImage(
                kernel=manifest.parent / str(data["kernel"]),
                initrd=manifest.parent / "initrd.img",
                kernel_release=str(data["kernel_release"]),
                packages={str(k): str(v) for k, v in data["packages"].items()},
                modules=tuple(str(m) for m in data["modules"]),
                key=key,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # damaged: ignore it and build again
        if image.kernel.is_file() and image.initrd.is_file():
            os.utime(manifest)  # marks it as in use for _prune
            return image
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(
    cache: Path, key: str, packages: Mapping[str, str], debs: Sequence[Path], modules: Sequence[str]
) -> GuestImage:
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
    try:
        root = scratch / "root"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise GuestImageError(f"expected one kernel in the package, found {kernels}")
        release = kernels[0].name.removeprefix("vmlinuz-")
        busybox = root / "bin" / "busybox"
        if not busybox.is_file():
            raise GuestImageError(f"{BUSYBOX_PACKAGE} has no /bin/busybox")
        loaded = resolve_modules(root / "lib" / "modules" / release, modules)

        out = scratch / "out"
        out.mkdir()
        bzimage = kernels[0].read_bytes()
        vmlinux = pvh_vmlinux(bzimage)
        kernel_name = "vmlinux" if vmlinux is not None else "vmlinuz"
        (out / kernel_name).write_bytes(vmlinux if vmlinux is not None else bzimage)
        archive = cpio.pack_newc(_initramfs_entries(busybox.read_bytes(), loaded))
        # mtime=0: the same inputs give the same initrd bytes.
        (out / "initrd.img").write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
        manifest = {
            "key": key,
            "kernel": kernel_name,
            "kernel_release": release,
            "packages": dict(packages),
            "modules": [name for name, _ in loaded],
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        final = cache / f"guest-{release}-{key}"
        os.replace(out, final)  # atomic: readers see a complete build or none
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    image = _load_built(cache, key)
    assert image is not None
    return image


def _initramfs_entries(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> list[cpio.CpioEntry]:
    entries = [cpio.directory(d) for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys")]
    entries += [
        cpio.directory("tmp", 0o1777),
        # Without /dev/console in the archive the kernel starts init with no stdin/out/err.
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, 0o666),
        cpio.regular_file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),  # for /init's #!/bin/sh; init installs the other applets
        cpio.regular_file("init", INIT_SCRIPT.encode(), 0o755),
    ]
    for name, data in modules:
        entries.append(cpio.regular_file(f"lib/modules/{name}.ko", data))
    order = "".join(f"{name}\n" for name, _ in modules)
    entries.append(cpio.regular_file("lib/modules/load-order", order.encode()))
    entries += [cpio.directory("hikkoshi"), cpio.directory("hikkoshi/workloads")]
    for rel, text in sorted(GUEST_FILES.items()):
        entries.append(cpio.regular_file(f"hikkoshi/{rel}", text.encode()))
    for name, workload in sorted(WORKLOADS.items()):
        entries.append(cpio.regular_file(f"hikkoshi/workloads/{name}", workload.script.encode(), 0o755))
        for rel, text in sorted(workload.files.items()):
            entries.append(cpio.regular_file(f"hikkoshi/{rel}", text.encode()))
    return entries


def _prune(cache: Path, keep: GuestImage, keep_debs: Sequence[Path]) -> None:
    """Drop builds unused for a week and downloads of package versions no longer wanted."""
    now = time.time()
    for manifest in cache.glob("guest-*/manifest.json"):
        build = manifest.parent
        if build != keep.directory and now - manifest.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(build, ignore_errors=True)
    wanted_packages = {deb.name.split("_", 1)[0] for deb in keep_debs}
    for deb in (cache / "debs").glob("*.deb"):
        if deb not in keep_debs and deb.name.split("_", 1)[0] in wanted_packages:
            deb.unlink(missing_ok=True)


# --- kernel ---------------------------------------------------------------------------------------------

_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note that makes an ELF kernel bootable by PVH


def pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside an xz-compressed bzImage, if it can boot via PVH.

    QEMU boots such an ELF directly (``-kernel vmlinux``), skipping the bzImage decompressor,
    which under TCG takes some 2.5 s of every boot (xz in emulated code). Returns ``None`` when
    the payload is not xz or the kernel lacks the PVH entry note; the bzImage then has to do.
    """
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        # The stream is followed by the rest of the bzImage, which the decompressor leaves alone.
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if _has_pvh_note(elf) else None


def _has_pvh_note(elf: bytes) -> bool:
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


# --- kernel modules -------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    # The kernel treats '-' and '_' in module names alike; modinfo's depends= uses '_'.
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes; busybox insmod wants them uncompressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise GuestImageError(f"cannot decompress kernel module {path.name} (no zstd in the stdlib)")


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (64-bit little-endian ELF) as a dict.

    Repeated keys (``alias``) keep their last value; ``depends`` is a comma-separated list.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestImageError("not a 64-bit little-endian ELF kernel module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + index * shentsize
        )
        return name, offset, size

    _, strtab_off, strtab_size = section(shstrndx)
    strtab = elf[strtab_off : strtab_off + strtab_size]
    for index in range(shnum):
        name_off, offset, size = section(index)
        if strtab[name_off : strtab.find(b"\0", name_off)] == b".modinfo":
            info: dict[str, str] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info[key] = value
            return info
    return {}


def resolve_modules(modules_dir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """``wanted`` modules and their dependencies from an unpacked ``/lib/modules/<release>``.

    Returns (name, uncompressed ELF) pairs, each after everything it depends on; modules built
    into the kernel are left out. Debian's package ships no modules.dep (depmod makes it at install
    time), so dependencies are read from each module's ``.modinfo`` instead.
    """
    index = {_module_name(p): p for p in (modules_dir / "kernel").rglob("*.ko*") if p.is_file()}
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(Path(line)) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in chain:
            raise GuestImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            raise GuestImageError(f"kernel module {name} not found under {modules_dir}")
        data = _read_module(index[name])
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        done.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return ordered


# --- running it -----------------------------------------------------------------------------------------


def kernel_cmdline(workload: str, params: Mapping[str, str | int] | None = None) -> str:
    """The kernel command line running ``workload`` with ``hikkoshi.<key>=<value>`` parameters."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(sorted(WORKLOADS))}")
    # panic=-1 reboots at once on a panic and -no-reboot turns that into QEMU exiting, so a broken
    # guest ends the test quickly instead of hanging until its timeout.
    args = ["console=ttyS0", "panic=-1", f"hikkoshi.workload={workload}"]
    for key, value in (params or {}).items():
        text = str(value)
        if not re.fullmatch(r"[a-z0-9_]+", key) or key == "workload":
            raise ValueError(f"bad guest parameter name {key!r}")
        if not text or re.search(r"\s", text):
            raise ValueError(f"guest parameter {key}={text!r} must be non-empty without spaces")
        args.append(f"hikkoshi.{key}={text}")
    return " ".join(args)


def _qemu_opt(value: str) -> str:
    return value.replace(",", ",,")  # QEMU option values escape commas by doubling them


def qemu_command(
    guest: GuestImage,
    drive_uri: str | None,
    workload: str,
    *,
    console_log: Path | None = None,
    params: Mapping[str, str | int] | None = None,
    memory_mib: int = 256,
    accel: Accel | None = None,
    cpu: str | None = None,
    qemu: str = DEFAULT_QEMU,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """A QEMU command line booting ``guest`` into ``workload``.

    ``drive_uri`` (e.g. ``nbd://127.0.0.1:10809``) becomes the guest's ``/dev/vda``; ``None``
    boots without a disk. The serial console goes to ``console_log``, or to stdout if ``None``.
    ``accel`` defaults to :func:`~hikkoshi.vm.accel.detect_accel`; ``cpu`` to ``host`` under KVM and
    QEMU's stable ``qemu64`` under TCG (pass a named model for migrations between different hosts).
    ``extra_args`` are appended. QEMU exits when the workload ends (the guest powers off) or the
    guest panics.
    """
    accel = accel or detect_accel(qemu=qemu)
    cmd = [
        qemu,
        "-accel",
        accel,
        "-cpu",
        cpu or ("host" if accel == "kvm" else "qemu64"),
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        kernel_cmdline(workload, params),
    ]
    if console_log is None:
        cmd += ["-serial", "stdio"]
    else:
        cmd += [
            "-chardev",
            f"file,id=console,path={_qemu_opt(str(console_log))}",
            "-serial",
            "chardev:console",
        ]
    if drive_uri is not None:
        cmd += ["-drive", f"file={_qemu_opt(drive_uri)},format=raw,if=virtio,cache=none"]
    cmd += extra_args
    return cmd
