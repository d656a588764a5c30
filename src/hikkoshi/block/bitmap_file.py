"""The presence bitmap on disk: a self-describing header, then the bit array.

The file only ever claims what is durable: the proxy fsyncs the cache first, then writes the changed
bitmap pages and fsyncs them. Bits only go from 0 to 1 between two persists (an invalidation is
persisted on its own before the guest can depend on it), so a torn page after a crash can only claim
less, never more. The header says what the bitmap describes; a file whose header does not match the
cache it is opened with is refused, never silently reset (the cache may hold the guest's writes).

Layout: page 0 is the header; the bit array starts at byte 4096.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from hikkoshi.block.presence import PresenceMap

MAGIC = b"HKSHPRES"
VERSION = 1
HEADER_SIZE = 4096
_FIXED = struct.Struct(">8sIIQIH")  # magic, version, block size, disk size, clean, identity length
_MAX_IDENTITY = 2048


class BitmapMismatch(Exception):
    """The bitmap file does not describe this cache: refuse rather than guess."""


@dataclass(frozen=True, slots=True)
class BitmapHeader:
    """What a bitmap file describes."""

    block_size: int
    disk_size: int
    identity: str
    clean: bool = False
    version: int = VERSION

    def encode(self) -> bytes:
        ident = self.identity.encode()
        if len(ident) > _MAX_IDENTITY:
            raise ValueError("upstream identity too long")
        body = (
            _FIXED.pack(MAGIC, self.version, self.block_size, self.disk_size, int(self.clean), len(ident))
            + ident
        )
        body += struct.pack(">I", zlib.crc32(body))
        return body + bytes(HEADER_SIZE - len(body))

    @classmethod
    def decode(cls, data: bytes) -> BitmapHeader:
        if len(data) < _FIXED.size + 4:
            raise BitmapMismatch("bitmap header truncated")
        magic, version, block_size, disk_size, clean, ident_len = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise BitmapMismatch("not a hikkoshi presence bitmap (bad magic)")
        if version != VERSION:
            raise BitmapMismatch(f"bitmap version {version}, this hikkoshi reads version {VERSION}")
        end = _FIXED.size + ident_len
        if ident_len > _MAX_IDENTITY or end + 4 > len(data):
            raise BitmapMismatch("bitmap header corrupt (identity length)")
        (crc,) = struct.unpack_from(">I", data, end)
        if crc != zlib.crc32(data[:end]):
            raise BitmapMismatch("bitmap header checksum mismatch")
        try:
            identity = data[_FIXED.size : end].decode()
        except UnicodeDecodeError:
            raise BitmapMismatch("bitmap header corrupt (identity)") from None
        return cls(block_size, disk_size, identity, bool(clean), version)


class BitmapFile:
    """A presence map persisted in a file next to the cache."""

    def __init__(
        self, path: Path, fd: int, header: BitmapHeader, presence: PresenceMap, was_clean: bool
    ) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.presence = presence
        #: Whether the previous user shut down cleanly (informational: the file is trusted either way).
        self.was_clean = was_clean

    @classmethod
    def open(cls, path: Path, block_size: int, disk_size: int, identity: str) -> BitmapFile:
        """Open or create; an existing file must describe exactly this cache and upstream."""
        expected = BitmapHeader(block_size, disk_size, identity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                presence = PresenceMap(disk_size, block_size)
                os.pwrite(fd, expected.encode(), 0)
                os.pwrite(fd, bytes(presence.bits), HEADER_SIZE)
                os.fsync(fd)
                _fsync_dir(path)
                was_clean = True
            else:
                header = BitmapHeader.decode(os.pread(fd, HEADER_SIZE, 0))
                for field, want, got in (
                    ("block size", block_size, header.block_size),
                    ("disk size", disk_size, header.disk_size),
                    ("upstream identity", identity, header.identity),
                ):
                    if want != got:
                        raise BitmapMismatch(f"{path}: {field} is {got!r} in the bitmap but {want!r} here")
                presence = PresenceMap(disk_size, block_size)
                bits = os.pread(fd, len(presence.bits), HEADER_SIZE)
                if len(bits) != len(presence.bits):
                    raise BitmapMismatch(f"{path}: bit array truncated")
                try:
                    presence = PresenceMap(disk_size, block_size, bits)
                except ValueError as exc:
                    raise BitmapMismatch(f"{path}: {exc}") from None
                was_clean = header.clean
            # Until close() says otherwise, a reader of this file must assume we crashed.
            os.pwrite(fd, expected.encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, expected, presence, was_clean)

    def persist(self) -> int:
        """Write changed pages and fsync; the caller has already fsynced the cache. Returns pages written."""
        pages = {i: self.presence.page(i) for i in self.presence.dirty_pages}
        self.presence.dirty_pages.clear()
        self.write_pages(pages)
        return len(pages)

    def write_pages(self, pages: dict[int, bytes]) -> None:
        """Write a snapshot of bitmap pages and fsync (safe from a worker thread: touches only the file)."""
        for index in sorted(pages):
            os.pwrite(self.fd, pages[index], HEADER_SIZE + index * PresenceMap.PAGE)
        if pages:
            os.fsync(self.fd)

    def close(self, clean: bool = True) -> None:
        """Persist and record a clean shutdown."""
        if self.fd < 0:
            return
        try:
            self.persist()
            if clean:
                header = BitmapHeader(
                    self.header.block_size, self.header.disk_size, self.header.identity, clean=True
                )
                os.pwrite(self.fd, header.encode(), 0)
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
