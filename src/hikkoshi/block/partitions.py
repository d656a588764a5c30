"""Partition tables of a raw disk, parsed from bytes: MBR (primary entries) and GPT.

Pure functions: the caller reads the sectors and hands them in. Nothing here raises on malformed input: a
table that does not check out is reported as absent (``None``), so that the caller can stay conservative.
Offsets and lengths are in bytes, clipped to the disk.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MBR_SECTOR = 512  # MBR LBAs are taken as 512-byte sectors (4Kn disks with an MBR are not handled)
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE_TYPE = 0xEE
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER_MIN = 92
# Far above the usual 128 entries of 128 bytes; bounds what a corrupt header can make us read.
GPT_MAX_ENTRIES_BYTES = 1 << 20


@dataclass(frozen=True)
class Partition:
    """A byte extent of the disk. ``probe`` is False for containers (an extended partition, the
    protective entry of a GPT disk) that cannot themselves start with a file system."""

    start: int
    length: int
    probe: bool = True

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Mbr:
    """The primary entries of an MBR; ``protective`` if one of them has type 0xEE (a GPT disk)."""

    partitions: tuple[Partition, ...]
    protective: bool


def _clip(start: int, length: int, disk_size: int) -> Partition | None:
    if start >= disk_size or length <= 0:
        return None
    return Partition(start, min(length, disk_size - start))


def parse_mbr(sector: bytes, disk_size: int) -> Mbr | None:
    """The partitions of a classic MBR in ``sector`` (the disk's first 512 bytes), or None.

    None when the boot signature is missing, when a status byte is neither 0x00 nor 0x80 (then the
    sector is a volume boot record's code, not a table — the same test Linux applies), or when no entry
    describes anything. Entries of any type with a non-zero size count (Linux uses them regardless of
    type); extended and protective entries are containers, not probed for a file system.
    """
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    parts: list[Partition] = []
    protective = False
    for i in range(4):
        entry = sector[446 + 16 * i : 462 + 16 * i]
        status, ptype = entry[0], entry[4]
        if status not in (0x00, 0x80):
            return None
        start, count = struct.unpack_from("<II", entry, 8)
        if count == 0:
            continue
        part = _clip(start * MBR_SECTOR, count * MBR_SECTOR, disk_size)
        if ptype == PROTECTIVE_TYPE:
            protective = True
        if part is not None:
            container = ptype == PROTECTIVE_TYPE or ptype in EXTENDED_TYPES
            parts.append(Partition(part.start, part.length, probe=not container))
    if not parts and not protective:
        return None
    return Mbr(tuple(parts), protective)


@dataclass(frozen=True)
class GptHeader:
    """The fields of a GPT header that locate and check its partition entries."""

    sector_size: int
    my_lba: int
    alternate_lba: int
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int

    @property
    def entries_offset(self) -> int:
        return self.entries_lba * self.sector_size

    @property
    def entries_length(self) -> int:
        return self.num_entries * self.entry_size


def parse_gpt_header(data: bytes, sector_size: int, lba: int, disk_size: int) -> GptHeader | None:
    """The GPT header in ``data`` (the sector at ``lba``), or None if it does not check out: signature,
    header CRC32, its own LBA, a sane entry array that lies on the disk."""
    if len(data) < GPT_HEADER_MIN or data[:8] != GPT_SIGNATURE:
        return None
    (header_size, header_crc) = struct.unpack_from("<II", data, 12)
    if header_size < GPT_HEADER_MIN or header_size > min(len(data), sector_size):
        return None
    if zlib.crc32(data[:16] + b"\0\0\0\0" + data[20:header_size]) != header_crc:
        return None
    my_lba, alternate_lba = struct.unpack_from("<QQ", data, 24)
    entries_lba, num_entries, entry_size, entries_crc = struct.unpack_from("<QIII", data, 72)
    if my_lba != lba or entry_size < 128 or entry_size % 128 or num_entries == 0:
        return None
    header = GptHeader(sector_size, my_lba, alternate_lba, entries_lba, num_entries, entry_size, entries_crc)
    if header.entries_length > GPT_MAX_ENTRIES_BYTES or entries_lba == 0:
        return None
    if header.entries_offset + header.entries_length > disk_size:
        return None
    return header


def parse_gpt_entries(data: bytes, header: GptHeader, disk_size: int) -> tuple[Partition, ...] | None:
    """The used entries of a GPT partition array, or None if its CRC32 or an entry is wrong."""
    if len(data) != header.entries_length or zlib.crc32(data) != header.entries_crc:
        return None
    parts: list[Partition] = []
    for i in range(header.num_entries):
        entry = data[i * header.entry_size : (i + 1) * header.entry_size]
        if not any(entry[:16]):  # unused entry: all-zero type GUID
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            return None
        part = _clip(first * header.sector_size, (last - first + 1) * header.sector_size, disk_size)
        if part is not None:
            parts.append(part)
    return tuple(parts)
