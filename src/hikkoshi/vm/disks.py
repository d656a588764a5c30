"""Disk files of a VM: raw images, thin (sparse) or thick (allocated), created or imported.

Thin disks are sparse files: blocks take space when the guest first writes them, so a datastore can
promise more than it holds. Thick disks have every block allocated at creation (``fallocate``),
so the guest can never meet a full file system later. Imports go through ``qemu-img convert``,
which reads any format QEMU knows (qcow2, vmdk, vdi, raw, ...) and writes raw.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Literal

from hikkoshi.vm.errors import DatastoreError

Provisioning = Literal["thin", "thick"]
QEMU_IMG = "qemu-img"


def create_disk(path: Path, size: int, provisioning: Provisioning) -> None:
    """Create a new raw disk file of ``size`` bytes; fails if ``path`` exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if provisioning == "thick":
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise DatastoreError(
                    f"cannot allocate {size} bytes for {path.name}: {exc.strerror}"
                ) from None
        else:
            os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies on disk (``st_blocks`` are 512-byte units)."""
    return path.stat().st_blocks * 512


def image_info(path: Path, fmt: str | None = None) -> tuple[str, int]:
    """``(format, virtual size)`` of an image as ``qemu-img info`` sees it.

    Images with a backing file are refused: they would pull other files of this host into the
    import. ``fmt`` skips format probing (which trusts the image's first bytes).
    """
    cmd = [QEMU_IMG, "info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DatastoreError(f"{QEMU_IMG} not found: importing an image needs qemu-utils") from None
    if proc.returncode != 0:
        raise DatastoreError(f"cannot read image {path}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    if info.get("backing-filename"):
        raise DatastoreError(
            f"{path} is a {info['format']} image on top of {info['backing-filename']}; "
            "flatten it first (qemu-img convert) and import the result"
        )
    return str(info["format"]), int(info["virtual-size"])


def import_image(
    source: Path, path: Path, size: int | None, provisioning: Provisioning, fmt: str | None = None
) -> int:
    """Convert ``source`` (any format qemu-img reads, or ``fmt``) into a new raw disk at ``path``.

    The disk is ``size`` bytes, or the image's own virtual size (rounded up to whole sectors) if
    ``size`` is ``None``; a ``size`` smaller than the image is refused (it would cut off the
    guest's data). Returns the size.
    """
    fmt, virtual = image_info(source, fmt)
    if size is None:
        size = -(-virtual // 512) * 512
    elif size < virtual:
        raise DatastoreError(f"{source} holds {virtual} bytes; a {size}-byte disk would cut it off")
    if path.exists():
        raise DatastoreError(f"{path} exists already")
    cmd = [QEMU_IMG, "convert", "-q", "-f", fmt, "-O", "raw"]
    if provisioning == "thick":
        cmd += ["-o", "preallocation=falloc"]
    cmd += [str(source), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        if proc.returncode != 0:
            raise DatastoreError(f"qemu-img convert {source} failed: {proc.stderr.strip()}")
        if size > virtual:
            with path.open("r+b") as f:
                if provisioning == "thick":
                    os.posix_fallocate(f.fileno(), 0, size)
                else:
                    f.truncate(size)
        os.chmod(path, 0o600)
        with path.open("rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size
