"""A raw image file (or block device) as a block device, sparse-aware."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Awaitable
from pathlib import Path

from hikkoshi.block import fallocate
from hikkoshi.nbd.constants import BASE_ALLOCATION, AllocationFlag
from hikkoshi.nbd.device import BlockDevice, Buffer, Capabilities, MaybeAwaitable

_ZERO_CHUNK = 1 << 20
#: Bound the work of one block status query; the client asks again for the rest.
_MAX_EXTENTS = 1 << 16
_HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)


class RawFile(BlockDevice):
    """Serves a raw image: pread/pwrite, holes via SEEK_DATA/SEEK_HOLE, TRIM and zeroes via fallocate."""

    meta_contexts = (BASE_ALLOCATION,)

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open image {self.path}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{self.path} is neither a regular file nor a block device")
        self.is_regular = stat.S_ISREG(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        can_punch = self.is_regular and not read_only and fallocate.can_punch(self.fd, self.size)
        # Learned on first use (probing it would allocate past the end of the user's image).
        self._can_zero_range = self.is_regular and not read_only
        self.can_punch = can_punch
        self._seek_works = self.is_regular
        self.capabilities = Capabilities(
            read_only=read_only,
            trim=not read_only,
            write_zeroes=not read_only,
            fast_zero=can_punch,
        )

    def read(self, offset: int, length: int) -> Buffer:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # Short only if the file shrank underneath us, or at a pipe-like EOF: pad.
            return data + bytes(length - len(data))
        return data

    def write(self, offset: int, data: memoryview, fua: bool) -> MaybeAwaitable[None]:
        if fua:
            os.pwritev(self.fd, [data], offset, os.RWF_DSYNC)
            return None
        n = os.pwrite(self.fd, data, offset)
        while n < len(data):
            n += os.pwrite(self.fd, data[n:], offset + n)
        return None

    def flush(self) -> Awaitable[None]:
        # fdatasync can take long on a busy disk: keep it off the event loop.
        return asyncio.to_thread(os.fdatasync, self.fd)

    def _sync_range(self, fua: bool) -> MaybeAwaitable[None]:
        return self.flush() if fua else None

    def trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        if self.can_punch and length:
            fallocate.punch_hole(self.fd, offset, length)
        # Without hole punching, TRIM is advisory and may do nothing.
        return self._sync_range(fua)

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> MaybeAwaitable[None]:
        if length == 0:
            return None
        if may_trim and self.can_punch:
            fallocate.punch_hole(self.fd, offset, length)
            return self._sync_range(fua)
        if self._can_zero_range:
            try:
                fallocate.zero_range(self.fd, offset, length)
                return self._sync_range(fua)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_zero_range = False
        if fast_only:
            raise OSError(errno.ENOTSUP, "zeroing would be slow here")
        else:
            zeros = bytes(min(length, _ZERO_CHUNK))
            end = offset + length
            while offset < end:
                n = os.pwrite(self.fd, zeros[: min(len(zeros), end - offset)], offset)
                offset += n
        return self._sync_range(fua)

    def cache(self, offset: int, length: int) -> MaybeAwaitable[None]:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        return None

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context != BASE_ALLOCATION or not self._seek_works:
            return [(length, 0)]
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < _MAX_EXTENTS:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    data = end
                elif exc.errno == errno.EINVAL and not out:
                    self._seek_works = False
                    return [(length, 0)]
                else:
                    raise
            if data > pos:
                hole_end = min(data, end)
                out.append((hole_end - pos, _HOLE))
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                hole = end
            data_end = min(hole, end)
            if data_end <= pos:  # the file changed under us; claim data, which is always safe
                data_end = end
            out.append((data_end - pos, 0))
            pos = data_end
        return out

    def read_fd(self) -> int:
        # Exactly RawFile: a subclass may change what ``read`` returns.
        return self.fd if type(self) is RawFile else -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
