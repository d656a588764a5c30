"""The payload memory of one NBD server: reservations within a budget, first come first served. Sans I/O.

Every payload byte a connection holds (a write's payload being received, a read's reply waiting in the
transport) is covered by a reservation made before the bytes exist. A reservation that does not fit now
waits in one queue for the whole server and is granted in arrival order: a large request is not starved by
a stream of small ones, and nobody jumps the queue while others wait.

Buffers are reused: one given back is kept in a cache (most of the cost of a large fresh ``bytearray`` is
the kernel faulting in and zeroing its pages). Cached buffers count against the budget too, but yield to
reservations: a reservation that needs their room drops as many as it takes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class Waiter:
    """A reservation waiting its turn; ``granted`` once its bytes are reserved for it."""

    __slots__ = ("granted", "nbytes", "on_grant")

    def __init__(self, nbytes: int, on_grant: Callable[[], None]) -> None:
        self.nbytes = nbytes
        self.on_grant = on_grant
        self.granted = False


class PayloadMemory:
    """Reservations and reusable buffers of one server, within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        #: Bytes reserved (buffers in use are covered by reservations).
        self.reserved = 0
        #: Bytes in cached buffers.
        self.cached = 0
        #: The most ever reserved at once (for statistics and tests).
        self.peak = 0
        self._free: dict[int, list[bytearray]] = {}
        self._waiters: deque[Waiter] = deque()

    @property
    def waiting(self) -> int:
        """Reservations in the queue."""
        return len(self._waiters)

    def reserve(self, nbytes: int) -> bool:
        """Reserve now if that fits and nobody waits before us; False otherwise (then :meth:`wait`)."""
        if self._waiters or self.reserved + nbytes > self.budget:
            return False
        self._take(nbytes)
        return True

    def wait(self, nbytes: int, on_grant: Callable[[], None]) -> Waiter:
        """Queue a reservation; ``on_grant`` is called (from inside a later :meth:`release`, or at once
        when it fits) after the bytes are reserved for the waiter, which then owns them."""
        if nbytes > self.budget:
            raise ValueError(f"a reservation of {nbytes} bytes can never fit a budget of {self.budget}")
        waiter = Waiter(nbytes, on_grant)
        self._waiters.append(waiter)
        self._grant()
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """The waiter's owner is gone: forget it, and give back its bytes if they were granted."""
        if waiter.granted:
            waiter.granted = False
            self.release(waiter.nbytes)
            return
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._grant()  # it may have been the head, holding back smaller ones behind it

    def release(self, nbytes: int) -> None:
        """Give back reserved bytes; waiters that now fit are granted, in order."""
        self.reserved -= nbytes
        assert self.reserved >= 0, "released more than was reserved"
        self._grant()

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes, covered by a reservation the caller holds: reused if one is cached."""
        free = self._free.get(size)
        if free:
            self.cached -= size
            return free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """A buffer taken earlier is no longer used: cache it if the budget has room for it."""
        size = len(buf)
        if self.reserved + self.cached + size <= self.budget:
            self._free.setdefault(size, []).append(buf)
            self.cached += size

    def _take(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)
        excess = self.reserved + self.cached - self.budget
        if excess > 0:
            self._evict(excess)

    def _evict(self, nbytes: int) -> None:
        # Largest buffers first: fewer of them to drop.
        for size in sorted(self._free, reverse=True):
            free = self._free[size]
            while free and nbytes > 0:
                free.pop()
                self.cached -= size
                nbytes -= size
            if not free:
                del self._free[size]
            if nbytes <= 0:
                return

    def _grant(self) -> None:
        while self._waiters and self.reserved + self._waiters[0].nbytes <= self.budget:
            waiter = self._waiters.popleft()
            self._take(waiter.nbytes)
            waiter.granted = True
            waiter.on_grant()


class ConnectionMemory:
    """One connection's share of a :class:`PayloadMemory`: at most ``limit`` bytes reserved at once.

    ``wake`` is called when a reservation that failed may now succeed (a grant from the server's queue, or
    memory of the connection's own given back); it may be called from inside another connection's
    :meth:`release`, so it should only schedule the retry.
    """

    __slots__ = ("_wake", "drain", "freed", "limit", "memory", "over_own", "reserved", "spare", "waiter")

    def __init__(self, memory: PayloadMemory, limit: int, wake: Callable[[], None]) -> None:
        self.memory = memory
        self.limit = limit
        self._wake = wake
        #: Every byte this connection holds a reservation for (the rest below are parts of it).
        self.reserved = 0
        #: Granted by the queue and not used yet.
        self.spare = 0
        #: Reply bytes handed to the transport: given back by :meth:`drained`.
        self.drain = 0
        self.waiter: Waiter | None = None
        #: A reservation waits for this connection's own memory to come back.
        self.over_own = False
        self.freed = False

    @property
    def waiting(self) -> bool:
        """A reservation failed and waits: for the server's queue or for our own memory."""
        return self.waiter is not None or self.over_own

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` now, or arrange for ``wake`` once that may succeed and return False."""
        if self.spare >= nbytes:
            self.spare -= nbytes
            return True
        if self.waiter is not None or self.freed:
            return False
        if self.spare:
            # Granted for a request that went another way: back to the queue first.
            spare, self.spare = self.spare, 0
            self.release(spare)
        if self.reserved + nbytes > self.limit:
            self.over_own = True
            return False
        if self.memory.reserve(nbytes):
            self.reserved += nbytes
            return True
        self.waiter = self.memory.wait(nbytes, self._granted)
        return False

    def _granted(self) -> None:
        waiter = self.waiter
        assert waiter is not None and waiter.granted
        self.waiter = None
        waiter.granted = False  # ours now: released with the rest of ``reserved``
        self.reserved += waiter.nbytes
        self.spare += waiter.nbytes
        self._wake()

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` of ours."""
        if self.freed or not nbytes:
            return
        self.reserved -= nbytes
        self.memory.release(nbytes)
        if self.over_own:
            self.over_own = False
            self._wake()

    def drained(self) -> None:
        """The transport has sent every reply it held: their memory is free."""
        if self.drain:
            drain, self.drain = self.drain, 0
            self.release(drain)

    def free(self) -> None:
        """The connection is gone: give back everything, and leave the queue."""
        if self.freed:
            return
        if self.waiter is not None:
            self.memory.cancel(self.waiter)
            self.waiter = None
        if self.reserved:
            self.memory.release(self.reserved)
            self.reserved = self.spare = self.drain = 0
        self.freed = True
