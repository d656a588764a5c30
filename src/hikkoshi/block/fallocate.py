"""fallocate(2) with modes (Python's os module offers only plain allocation)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raise OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range; it reads back as zeroes and the file size is unchanged."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero a range, keeping it allocated."""
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)


def can_punch(fd: int, size: int) -> bool:
    """Whether the file system can punch holes, tested past the end of the file where nothing changes.

    Only hole punching is probed this way: other modes (zero range) would allocate blocks past the end,
    changing the user's image; they are detected on first use instead.
    """
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size + (1 << 20), 4096)
    except OSError:
        return False
    return True


SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range's dirty pages to disk without waiting (sync_file_range WRITE).

    A bulk copy calls it as it goes, so the fsync at its end finds little left to write. Best effort:
    file systems that do not support it are ignored.
    """
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
