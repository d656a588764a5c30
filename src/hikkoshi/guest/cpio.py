"""A small writer and reader for the "newc" cpio format, the format of a Linux initramfs.

Only what an initramfs needs: regular files, directories, symlinks and device nodes, all owned by
root. Timestamps default to zero so that the same entries always give the same bytes (the guest
image cache relies on that).

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst): each entry is
the magic ``070701``, thirteen 8-digit hex fields, the NUL-terminated name padded to a multiple of
four bytes (counting from the start of the header), then the data padded likewise. The archive ends
with an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110  # magic (6) + 13 fields of 8 hex digits
_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)


class CpioError(ValueError):
    """A malformed archive, or an entry that cannot be encoded."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o644``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    mtime: int = 0

    @property
    def is_dir(self) -> bool:
        """Whether this entry is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        """Whether this entry is a symbolic link (``data`` is then the target)."""
        return stat.S_ISLNK(self.mode)


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    """A directory entry."""
    return CpioEntry(name, stat.S_IFDIR | perm)


def regular_file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    """A regular file entry."""
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    """A symbolic link ``name -> target``."""
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
    """A character device node (the kernel needs ``/dev/console`` to give init a console)."""
    return CpioEntry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(values: dict[str, int]) -> bytes:
    out = bytearray(MAGIC)
    for field in _FIELDS:
        value = values[field]
        if not 0 <= value <= 0xFFFFFFFF:
            raise CpioError(f"cpio field {field}={value} does not fit in 32 bits")
        out += b"%08X" % value
    return bytes(out)


def _encode(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.lstrip("/")
    if not name or "\0" in name:
        raise CpioError(f"invalid cpio member name {entry.name!r}")
    if entry.is_dir and entry.data:
        raise CpioError(f"directory {name!r} cannot have data")
    name_bytes = name.encode() + b"\0"
    header = _header(
        {
            "ino": ino,
            "mode": entry.mode,
            "uid": 0,
            "gid": 0,
            # The kernel only looks at nlink to find hard links (nlink >= 2 on a non-directory),
            # so 1 for everything but directories keeps each file independent.
            "nlink": 2 if entry.is_dir else 1,
            "mtime": entry.mtime,
            "filesize": len(entry.data),
            "devmajor": 0,
            "devminor": 0,
            "rdevmajor": entry.rdev_major,
            "rdevminor": entry.rdev_minor,
            "namesize": len(name_bytes),
            "check": 0,
        }
    )
    name_part = name_bytes + b"\0" * _pad4(_HEADER_LEN + len(name_bytes))
    return header + name_part + entry.data + b"\0" * _pad4(len(entry.data))


def write_newc(entries: Iterable[CpioEntry], out: BinaryIO) -> int:
    """Write ``entries`` and the trailer to ``out`` as a newc archive; return the bytes written.

    Parents must come before their children (the kernel does not create missing directories).
    """
    written = 0
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        name = entry.name.lstrip("/")
        if name in seen:
            raise CpioError(f"duplicate cpio member {name!r}")
        seen.add(name)
        written += out.write(_encode(entry, ino))
    written += out.write(_encode(CpioEntry(TRAILER, 0), 0))
    return written


def pack_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The newc archive of ``entries`` as bytes."""
    buf = io.BytesIO()
    write_newc(entries, buf)
    return buf.getvalue()


def read_newc(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (up to its trailer) back into entries; for tests and sanity checks."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = data[pos : pos + _HEADER_LEN]
        if len(header) < _HEADER_LEN:
            raise CpioError(f"truncated cpio header at offset {pos}")
        if header[:6] != MAGIC:
            raise CpioError(f"bad cpio magic {header[:6]!r} at offset {pos}")
        try:
            values = {field: int(header[6 + 8 * i : 14 + 8 * i], 16) for i, field in enumerate(_FIELDS)}
        except ValueError as exc:
            raise CpioError(f"bad cpio header field at offset {pos}") from exc
        name_start = pos + _HEADER_LEN
        name_end = name_start + values["namesize"]
        if values["namesize"] == 0 or name_end > len(data) or data[name_end - 1] != 0:
            raise CpioError(f"bad cpio member name at offset {pos}")
        name = data[name_start : name_end - 1].decode()
        data_start = name_end + _pad4(name_end - pos)
        data_end = data_start + values["filesize"]
        if data_end > len(data):
            raise CpioError(f"truncated data of cpio member {name!r}")
        if name == TRAILER:
            return entries
        entries.append(
            CpioEntry(
                name=name,
                mode=values["mode"],
                data=data[data_start:data_end],
                rdev_major=values["rdevmajor"],
                rdev_minor=values["rdevminor"],
                mtime=values["mtime"],
            )
        )
        pos = data_end + _pad4(values["filesize"])
