"""Which blocks of a disk are present locally: a pure bitmap with a population count and range queries."""

from __future__ import annotations

from collections.abc import Iterator

# Number of set bits in each byte value.
_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


class PresenceMap:
    """One bit per block; bit set = the block's data is in the local cache.

    ``dirty_pages`` records which 4 KiB pages of the bit array changed since the last persist, so the
    on-disk copy can be updated in place.
    """

    PAGE = 4096

    def __init__(self, disk_size: int, block_size: int, bits: bytes | None = None) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two")
        self.disk_size = disk_size
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1
        self.blocks = (disk_size + block_size - 1) >> self.shift
        nbytes = (self.blocks + 7) >> 3
        if bits is None:
            self.bits = bytearray(nbytes)
        else:
            if len(bits) != nbytes:
                raise ValueError(f"bitmap of {len(bits)} bytes for {self.blocks} blocks")
            self.bits = bytearray(bits)
            # Bits past the last block must be clear, or the count would lie.
            if self.blocks & 7 and self.bits[-1] >> (self.blocks & 7):
                raise ValueError("bitmap has bits set past the last block")
        self.present = sum(_POPCOUNT[b] for b in self.bits)
        self.dirty_pages: set[int] = set()

    # --- queries ------------------------------------------------------------------------------------------

    def block_range(self, offset: int, length: int) -> range:
        """Blocks touched by a byte range."""
        if length <= 0:
            return range(offset >> self.shift, offset >> self.shift)
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def test(self, block: int) -> bool:
        return bool(self.bits[block >> 3] >> (block & 7) & 1)

    def all_present(self, offset: int, length: int) -> bool:
        """Whether every block of a byte range is present (the fast path of every read)."""
        if self.present == self.blocks:
            return True
        first = offset >> self.shift
        last = (offset + max(length, 1) - 1) >> self.shift
        if first == last:
            return bool(self.bits[first >> 3] >> (first & 7) & 1)
        bits = self.bits
        return all(bits[b >> 3] >> (b & 7) & 1 for b in range(first, last + 1))

    def missing(self, offset: int, length: int) -> list[int]:
        """Blocks of a byte range that are not present."""
        bits = self.bits
        return [b for b in self.block_range(offset, length) if not bits[b >> 3] >> (b & 7) & 1]

    def missing_runs(self, start_block: int = 0, end_block: int | None = None) -> Iterator[tuple[int, int]]:
        """Runs (first block, count) of missing blocks, in order."""
        end = self.blocks if end_block is None else min(end_block, self.blocks)
        bits = self.bits
        b = start_block
        while b < end:
            # Skip whole bytes of present blocks quickly.
            if b & 7 == 0 and b + 8 <= end and bits[b >> 3] == 0xFF:
                b += 8
                continue
            if bits[b >> 3] >> (b & 7) & 1:
                b += 1
                continue
            run = b
            while b < end and not bits[b >> 3] >> (b & 7) & 1:
                if b & 7 == 0 and b + 8 <= end and bits[b >> 3] == 0:
                    b += 8
                else:
                    b += 1
            yield run, b - run

    def block_span(self, block: int) -> tuple[int, int]:
        """Byte offset and length of a block (the last one may be short)."""
        start = block << self.shift
        return start, min(self.block_size, self.disk_size - start)

    @property
    def complete(self) -> bool:
        return self.present == self.blocks

    @property
    def present_bytes(self) -> int:
        """Bytes of the disk that are present (the short last block counted by its real size)."""
        if self.present == self.blocks:
            return self.disk_size
        full = self.present << self.shift
        last = self.blocks - 1
        if self.blocks and self.test(last):
            full -= self.block_size - self.block_span(last)[1]
        return full

    # --- changes ------------------------------------------------------------------------------------------

    def set(self, block: int) -> bool:
        """Mark a block present; return whether it changed."""
        i = block >> 3
        mask = 1 << (block & 7)
        if self.bits[i] & mask:
            return False
        self.bits[i] |= mask
        self.present += 1
        self.dirty_pages.add(i // self.PAGE)
        return True

    def clear(self, block: int) -> bool:
        """Mark a block missing again (invalidation); return whether it changed."""
        i = block >> 3
        mask = 1 << (block & 7)
        if not self.bits[i] & mask:
            return False
        self.bits[i] &= ~mask & 0xFF
        self.present -= 1
        self.dirty_pages.add(i // self.PAGE)
        return True

    def page(self, index: int) -> bytes:
        """One page of the bit array, as stored on disk."""
        return bytes(self.bits[index * self.PAGE : (index + 1) * self.PAGE])
