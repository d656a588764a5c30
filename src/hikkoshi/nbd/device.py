"""The interface every export layer implements."""

from __future__ import annotations

import abc
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

T = TypeVar("T")
#: A result that is either ready now (the fast path) or must be awaited (for example a fetch from upstream).
MaybeAwaitable: TypeAlias = T | Awaitable[T]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can do; the server advertises exactly these."""

    read_only: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    write_zeroes: bool = True
    fast_zero: bool = False
    cache: bool = True
    #: True when a flush on one connection covers writes made on every other connection.
    multi_conn: bool = True
    rotational: bool = False


class BlockDevice(abc.ABC):
    """A fixed-size array of bytes that an NBD export serves.

    Methods may finish at once (return a value) or return an awaitable. Synchronous implementations must
    be fast (page-cache I/O); anything that may block for long (fsync, network) returns an awaitable.
    A ``data`` view given to :meth:`write` is valid only until the method returns: an asynchronous
    implementation copies it first. Errors are raised as ``OSError`` with a meaningful errno.
    """

    size: int
    capabilities: Capabilities
    #: Block status meta contexts this device answers (``base:allocation`` and contexts of our own).
    meta_contexts: tuple[str, ...] = ()

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> MaybeAwaitable[Buffer]:
        """The bytes at [offset, offset+length)."""

    @abc.abstractmethod
    def write(self, offset: int, data: memoryview, fua: bool) -> MaybeAwaitable[None]:
        """Store ``data`` at ``offset``; with ``fua`` it is durable when this returns."""

    @abc.abstractmethod
    def flush(self) -> Awaitable[None]:
        """Make every completed write durable."""

    @abc.abstractmethod
    def trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        """The range's contents are no longer needed (reads may return anything, usually zeroes)."""

    @abc.abstractmethod
    def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> MaybeAwaitable[None]:
        """Zero the range. ``may_trim``: may become a hole. ``fast_only``: ENOTSUP unless cheap."""

    def cache(self, offset: int, length: int) -> MaybeAwaitable[None]:
        """Hint that the range will be read soon."""
        return None

    def extents(self, context: str, offset: int, length: int) -> MaybeAwaitable[list[tuple[int, int]]]:
        """Block status of a range in one meta context: consecutive (length, flags) from ``offset``."""
        return [(length, 0)]

    def read_fd(self) -> int:
        """A file descriptor whose bytes :meth:`read` returns verbatim (the server may pread it), or -1.

        Asked before every batch of requests: a layer may change its answer between batches (a storage
        move switches the file under an export).
        """
        return -1

    def close(self) -> None:
        """Release resources; the device is not used afterwards."""
        return None
