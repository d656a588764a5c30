"""A WAN link as a pure, sans-I/O model: bytes arrive at times, the model says when each is delivered.

One :class:`LinkDirection` is one direction of a link: a bottleneck that serialises the bytes of all
connections first in, first out at ``rate`` (so every connection shares it, as on a real path), a bounded
queue in front of it, then a propagation delay (plus optional jitter) to the far end. Each connection's
bytes in that direction are a :class:`Flow`, delivered in order.

Loss is emulated the way it looks on a TCP connection, since TCP cannot lose bytes: with probability
``loss`` per segment (``segment_bytes``, a 1448-byte MSS by default) the segment arrives one retransmission
timeout late, and every later byte of the same connection waits for it (head-of-line blocking). Other
connections are not held up.

The model never reads a clock: every call takes ``now`` (seconds, any monotonic origin), and randomness
comes from the :class:`random.Random` it is given, so a seeded run is reproducible. The asyncio relay in
:mod:`hikkoshi.lab.wan` is a thin shell that feeds it socket reads and writes what it says is due.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

#: An Ethernet MSS (1500 - 20 IP - 20 TCP - 12 timestamp option).
SEGMENT_BYTES = 1448
#: Linux's minimum retransmission timeout.
MIN_RTO_MS = 200.0
#: Queue slack beyond one bandwidth-delay product in the default queue size.
QUEUE_SLACK = 64 << 10
#: Smallest default per-connection window (bytes the relay holds for one connection, one direction).
MIN_WINDOW = 4 << 20


@dataclass(frozen=True, slots=True)
class WanParams:
    """One direction of an emulated WAN path.

    ``delay_ms`` is the one-way propagation delay (a 50 ms RTT is 25 ms each way, see :meth:`from_rtt`);
    ``rate_bps`` the bottleneck rate in bits per second (None: unlimited); ``loss`` the probability that a
    segment is lost and retransmitted one RTO later; ``jitter_ms`` a random extra one-way delay, uniform in
    ``[0, jitter_ms]`` per segment (``delay_ms`` stays a floor, like propagation); ``queue_bytes`` the
    bottleneck buffer (None: one bandwidth-delay product plus 64 KiB); ``rto_ms`` the retransmission
    timeout (None: ``max(200, RTT + 4 * jitter)``); ``window_bytes`` how much one connection may have inside
    the link before its sender is paused, like a TCP receive window (None: enough for the rate).
    """

    delay_ms: float = 0.0
    rate_bps: float | None = None
    loss: float = 0.0
    jitter_ms: float = 0.0
    queue_bytes: int | None = None
    segment_bytes: int = SEGMENT_BYTES
    rto_ms: float | None = None
    window_bytes: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise ValueError(f"delay must be >= 0 ms, not {self.delay_ms}")
        if self.rate_bps is not None and not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ValueError(f"rate must be > 0 bit/s, not {self.rate_bps}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), not {self.loss}")
        if not (math.isfinite(self.jitter_ms) and self.jitter_ms >= 0):
            raise ValueError(f"jitter must be >= 0 ms, not {self.jitter_ms}")
        if self.segment_bytes < 1:
            raise ValueError("segment size must be >= 1 byte")
        if self.queue_bytes is not None and self.queue_bytes < self.segment_bytes:
            raise ValueError(f"queue must hold at least one segment ({self.segment_bytes} bytes)")
        if self.rto_ms is not None and not (math.isfinite(self.rto_ms) and self.rto_ms >= 0):
            raise ValueError(f"RTO must be >= 0 ms, not {self.rto_ms}")
        if self.window_bytes is not None and self.window_bytes < self.segment_bytes:
            raise ValueError(f"window must hold at least one segment ({self.segment_bytes} bytes)")

    @classmethod
    def from_rtt(
        cls,
        rtt_ms: float,
        rate_bps: float | None = None,
        loss: float = 0.0,
        jitter_ms: float = 0.0,
        queue_bytes: int | None = None,
    ) -> WanParams:
        """Parameters for a symmetric path with this round-trip time (half of it each way)."""
        return cls(rtt_ms / 2, rate_bps, loss, jitter_ms, queue_bytes)

    @property
    def delay(self) -> float:
        """One-way delay in seconds."""
        return self.delay_ms / 1000

    @property
    def jitter(self) -> float:
        return self.jitter_ms / 1000

    @property
    def rate(self) -> float | None:
        """Bottleneck rate in bytes per second."""
        return None if self.rate_bps is None else self.rate_bps / 8

    @property
    def rto(self) -> float:
        """Retransmission timeout in seconds: what a lost segment costs."""
        if self.rto_ms is not None:
            return self.rto_ms / 1000
        return max(MIN_RTO_MS / 1000, 2 * self.delay + 4 * self.jitter)

    @property
    def bdp(self) -> int:
        """Bandwidth-delay product (rate x RTT, assuming the same delay back) in bytes; 0 if unlimited."""
        return 0 if self.rate is None else math.ceil(self.rate * 2 * self.delay)

    @property
    def queue_limit(self) -> int | None:
        """The bottleneck buffer in bytes (None when the rate is unlimited: nothing ever queues)."""
        if self.rate is None:
            return None
        return self.queue_bytes if self.queue_bytes is not None else self.bdp + QUEUE_SLACK

    @property
    def window(self) -> int:
        """Per-connection limit on bytes inside the link (queued, in flight, waiting for the reader)."""
        if self.window_bytes is not None:
            return self.window_bytes
        if self.rate is None:
            return MIN_WINDOW
        inside = (self.queue_limit or 0) + self.rate * (self.delay + self.jitter + self.rto)
        return max(MIN_WINDOW, math.ceil(2 * inside))


@dataclass(slots=True)
class Piece:
    """Consecutive bytes of one flow delivered together at ``time`` (none of them due before it)."""

    first: float  # the earliest exact delivery time merged into this piece
    time: float
    size: int


@dataclass(eq=False, slots=True)
class Flow:
    """One connection's bytes in one direction: held in order until due."""

    pieces: deque[Piece] = field(default_factory=deque)
    #: The bytes themselves, as they came (a queue of buffers: no copying of what stays behind).
    chunks: deque[bytes | memoryview] = field(default_factory=deque)
    held: int = 0  # bytes accepted and not yet delivered
    #: The delivery time of the latest byte: nothing later may be delivered before it.
    last_time: float = -math.inf
    #: When the end of the stream (FIN, or a reset) reaches the far end; None until the sender ends.
    eof_at: float | None = None
    #: The sender reset the connection: the far end is reset (not half-closed) at ``eof_at``.
    abort: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    lost_segments: int = 0

    @property
    def ended(self) -> bool:
        """The sender has finished (FIN or reset); no more bytes will come."""
        return self.eof_at is not None

    def next_time(self) -> float | None:
        """When something (bytes, or the end) is next due; None if nothing is scheduled."""
        if self.pieces:
            return self.pieces[0].time
        return self.eof_at

    def schedule(self) -> list[tuple[float, int]]:
        """The pending deliveries, in order: (time, bytes)."""
        return [(p.time, p.size) for p in self.pieces]

    def pop_due(self, now: float) -> bytes:
        """Remove and return every byte due at ``now`` (in order; empty if none)."""
        n = 0
        pieces = self.pieces
        while pieces and pieces[0].time <= now:
            n += pieces.popleft().size
        if not n:
            return b""
        self.held -= n
        self.bytes_out += n
        chunks, parts = self.chunks, []
        while n:
            c = chunks[0]
            if len(c) <= n:
                parts.append(chunks.popleft())
                n -= len(c)
            else:
                view = memoryview(c)
                parts.append(view[:n])
                chunks[0] = view[n:]
                n = 0
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def push(self, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` until it is delivered (the link model calls this)."""
        self.chunks.append(data if isinstance(data, bytes) else bytes(data))
        self.held += len(data)
        self.bytes_in += len(data)

    def eof_due(self, now: float) -> bool:
        """Every byte is delivered and the end of the stream is due."""
        return not self.pieces and self.eof_at is not None and self.eof_at <= now

    def discard(self) -> int:
        """Drop everything undelivered (the receiver is gone); return how many bytes."""
        n = self.held
        self.pieces.clear()
        self.chunks.clear()
        self.held = 0
        return n


class LinkDirection:
    """One direction of the link: a shared FIFO bottleneck, then delay, jitter and loss per flow.

    ``granularity`` (seconds) lets consecutive segments of a flow due within that span be delivered
    together, at the latest of their times: never earlier than exact, at most that much later. It keeps the
    number of pieces (and of the shell's timer wake-ups) near one per ``granularity`` at any rate.
    """

    def __init__(self, params: WanParams, rng: random.Random | None = None, granularity: float = 0.0) -> None:
        if granularity < 0:
            raise ValueError("granularity must be >= 0")
        self.params = params
        self.rng = rng if rng is not None else random.Random()
        self.granularity = granularity
        #: When the bottleneck finishes serialising everything accepted so far.
        self.busy_until = -math.inf
        self.bytes_in = 0
        self.lost_segments = 0
        #: Segments (of any flow) still to pass before the next one is lost; None without loss.
        self._until_loss = self._next_loss()

    def _next_loss(self) -> int | None:
        """Draw the number of segments that get through before the next loss (geometric)."""
        loss = self.params.loss
        if not loss:
            return None
        u = 1.0 - self.rng.random()  # in (0, 1]
        return int(math.log(u) / math.log1p(-loss))

    # -- the queue -------------------------------------------------------------------------------------

    def backlog(self, now: float) -> int:
        """Bytes waiting in the bottleneck queue (accepted, not yet serialised) at ``now``."""
        rate = self.params.rate
        if rate is None or self.busy_until <= now:
            return 0
        return max(0, math.ceil((self.busy_until - now) * rate - 1e-6))  # (tolerating rounding)

    def room(self, now: float) -> int | None:
        """Bytes the queue can take at ``now`` (None: unlimited)."""
        limit = self.params.queue_limit
        if limit is None:
            return None
        return max(0, limit - self.backlog(now))

    def wait_for_room(self, now: float, need: int) -> float:
        """Seconds from ``now`` until the queue has room for ``need`` bytes (0 if it has already)."""
        limit = self.params.queue_limit
        rate = self.params.rate
        if limit is None or rate is None:
            return 0.0
        need = min(need, limit)
        if limit - self.backlog(now) >= need:
            return 0.0
        # backlog(t) = (busy_until - t) * rate <= limit - need; at least one byte's time, against rounding.
        t = self.busy_until - (limit - need) / rate
        return max(1 / rate, t - now)

    # -- arrivals --------------------------------------------------------------------------------------

    def send(self, flow: Flow, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes of ``flow`` arrive at the bottleneck at ``now``: schedule their delivery.

        The queue limit is not enforced here (the caller asks :meth:`room` first and reads no more):
        a sender that ignores it only makes the queue, and its delay, longer.
        """
        n = len(data)
        if flow.eof_at is not None:
            raise ValueError("data after the end of the stream")
        if n == 0:
            return
        p = self.params
        flow.push(data)
        self.bytes_in += n
        rate = p.rate
        start = now if rate is None else max(now, self.busy_until)
        seg, delay, jitter, rto = p.segment_bytes, p.delay, p.jitter, p.rto
        nseg = -(-n // seg)

        def due(end: int) -> float:
            """Exact delivery time of the segment ending at byte ``end`` (store and forward)."""
            return start + delay if rate is None else start + end / rate + delay

        # Pieces of about `granularity` each (exact times are linear in the byte offset).
        stride = nseg if rate is None else max(1, int(self.granularity * rate // seg))
        k = 0  # segments scheduled
        while k < nseg:
            if jitter or self._until_loss == 0:
                # One segment on its own: jittered, or lost (one RTO late).
                end = min((k + 1) * seg, n)
                t = due(end) + (self.rng.uniform(0.0, jitter) if jitter else 0.0)
                if self._until_loss == 0:
                    t += rto
                    flow.lost_segments += 1
                    self.lost_segments += 1
                    self._until_loss = self._next_loss()
                elif self._until_loss is not None:
                    self._until_loss -= 1
                self._emit(flow, t, t, end - k * seg)
                k += 1
                continue
            # A run of segments that arrive on time, up to the next loss.
            run = nseg - k if self._until_loss is None else min(nseg - k, self._until_loss)
            stop = k + run
            while k < stop:
                j = min(k + stride, stop)
                end = min(j * seg, n)
                self._emit(flow, due(min((k + 1) * seg, n)), due(end), end - k * seg)
                k = j
            if self._until_loss is not None:
                self._until_loss -= run
        if rate is not None:
            self.busy_until = start + n / rate

    def _emit(self, flow: Flow, first: float, t: float, size: int) -> None:
        """Append bytes whose exact delivery times span [first, t] (after any held-back byte)."""
        if flow.last_time > first:  # in order: a late segment holds back everything after it
            first = flow.last_time
            t = max(t, first)
        flow.last_time = t
        pieces = flow.pieces
        if pieces:
            last = pieces[-1]
            if t - last.first <= self.granularity:
                last.time = t
                last.size += size
                return
        pieces.append(Piece(first, t, size))

    def finish(self, flow: Flow, now: float, *, abort: bool = False) -> None:
        """The sender of ``flow`` ends its stream at ``now``: a FIN, or a reset if ``abort``.

        The end travels behind the flow's bytes and everything already queued; ending twice keeps the
        first time (a reset after a FIN still resets).
        """
        if abort:
            flow.abort = True
        if flow.eof_at is not None:
            return
        p = self.params
        start = now if p.rate is None else max(now, self.busy_until)
        t = start + p.delay + (self.rng.uniform(0.0, p.jitter) if p.jitter else 0.0)
        flow.eof_at = max(t, flow.last_time)
