"""Requests and write payloads as they arrive, sans I/O, received in place (no copies on the way in).

An asyncio ``BufferedProtocol`` asks :meth:`RequestReader.get_buffer` where the next bytes go and reports
how many came with :meth:`RequestReader.buffer_updated`; the reader parses requests out of them.

Its own buffer holds request headers and small payloads. It starts small (an idle connection costs
little) and doubles, up to ``_BASE_MAX``, while the client fills it with every receive.

A WRITE's payload is never allocated from its header's say-so. One of at most ``inline_max`` bytes is
awaited in the reader's own buffer and returned with its request. A longer one is returned as soon as its
header is parsed, with no payload, and the reader waits for the caller's decision: refuse it
(:meth:`skip_payload`: its bytes are discarded as they come) or take it (:meth:`stream_payload`). A taken
payload comes out in pieces (:meth:`next_piece`): straight from the reader's buffer when a whole piece is
already there, or else through a piece buffer the caller attaches once the payload's first bytes have
arrived (:meth:`piece_wanted`, :meth:`attach_piece`), which later bytes are received into. That buffer is
sized by what has arrived (at most ``GROWTH`` times as much, and replaced by a longer one as more comes),
never by what the header declares; the caller takes it within its memory budget. A payload longer than one
piece reuses the buffer piece after piece.
"""

from __future__ import annotations

from hikkoshi.nbd.constants import REQUEST_MAGIC, REQUEST_SIZE, Command
from hikkoshi.nbd.errors import ProtocolError
from hikkoshi.nbd.wire import REQUEST

#: The reader's own buffer: first size, largest size, and the room offered to every receive.
_BASE_MIN = 16 * 1024
_BASE_MAX = 256 * 1024
_MIN_FREE = 16 * 1024
#: Payloads up to this long are awaited whole in the reader's own buffer.
INLINE_MAX = 64 * 1024
#: A piece buffer is at most this many times the payload bytes received so far.
GROWTH = 16
_WRITE = int(Command.WRITE)
_NO_LIMIT = 1 << 32

Request = tuple[int, int, int, int, int, memoryview | None]


class RequestReader:
    """Incremental parser of requests and their payloads from a receive buffer.

    :meth:`next_request` returns ``(flags, command, handle, offset, length, payload)``. ``payload`` is a
    view into the buffer, valid only until the next :meth:`get_buffer`; it is None for commands without a
    payload, for a WRITE of more than ``max_payload`` bytes (whose bytes are then discarded, so the
    connection stays in sync and the request can be answered with an error), and for a WRITE whose payload
    awaits the caller's decision (:attr:`deciding`).
    """

    __slots__ = (
        "_buf",
        "_deciding",
        "_end",
        "_fill",
        "_grow",
        "_into_piece",
        "_offered",
        "_pending",
        "_piece",
        "_piece_max",
        "_skip",
        "_start",
        "_stream_left",
        "inline_max",
        "max_payload",
    )

    def __init__(
        self,
        max_payload: int = _NO_LIMIT,
        initial: bytes = b"",
        inline_max: int = INLINE_MAX,
        piece_max: int = 4 << 20,
    ) -> None:
        self.max_payload = max_payload
        self.inline_max = inline_max
        self._piece_max = max(piece_max, 1)
        self._buf = bytearray(max(_BASE_MIN, len(initial)))
        self._buf[: len(initial)] = initial
        self._start = 0
        self._end = len(initial)
        self._skip = 0
        self._pending: tuple[int, int, int, int, int] | None = None
        self._deciding = 0  # the length of a WRITE awaiting stream_payload() or skip_payload()
        self._stream_left = 0  # payload bytes of the streamed WRITE not yet handed out as pieces
        self._piece: bytearray | None = None
        self._fill = 0  # payload bytes in the piece buffer
        self._into_piece = False  # where the last get_buffer() pointed
        self._offered = 0
        self._grow = False

    # --- receiving ---------------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view where received bytes go."""
        piece = self._piece
        if piece is not None and self._start == self._end:
            target = min(len(piece), self._stream_left)
            if self._fill < target:
                self._into_piece = True
                return memoryview(piece)[self._fill : target]
        self._into_piece = False
        need = _MIN_FREE
        if self._pending is not None:
            need = max(need, self._pending[4] - (self._end - self._start))
        if self._start == self._end:
            self._start = self._end = 0
        size = len(self._buf)
        if self._grow and size < _BASE_MAX:
            need = max(need, size)  # the client filled all we offered: offer twice as much
        self._grow = False
        if size - self._end < need:
            used = self._end - self._start
            if size - used >= need and used < size // 2:
                self._buf[:used] = self._buf[self._start : self._end]
            else:
                # A fresh array: the old one may still be exported to a payload view.
                new = bytearray(max(min(2 * size, _BASE_MAX), used + need))
                new[:used] = self._buf[self._start : self._end]
                self._buf = new
            self._start, self._end = 0, used
        view = memoryview(self._buf)[self._end :]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the view from ``get_buffer``."""
        if self._into_piece:
            self._fill += nbytes
            return
        self._end += nbytes
        if nbytes >= self._offered:
            self._grow = True

    def feed(self, data: bytes | memoryview) -> None:
        """Copy bytes in (for tests and for bytes left over from negotiation)."""
        while data:
            view = self.get_buffer(len(data))
            n = min(len(view), len(data))
            view[:n] = data[:n]
            self.buffer_updated(n)
            data = data[n:]

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (or handed out as payload)."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        """Bytes of the reader's own buffer."""
        return len(self._buf)

    # --- requests ----------------------------------------------------------------------------------------

    def next_request(self) -> Request | None:
        """The next complete request, or None if more bytes (or a decision on a payload) are needed."""
        if self._deciding or self._stream_left:
            return None
        if self._skip:
            n = min(self._skip, self._end - self._start)
            self._start += n
            self._skip -= n
            if self._skip:
                return None
        header = self._pending
        if header is None:
            if self._end - self._start < REQUEST_SIZE:
                return None
            magic, flags, command, handle, offset, length = REQUEST.unpack_from(self._buf, self._start)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            self._start += REQUEST_SIZE
            if command != _WRITE:
                return flags, command, handle, offset, length, None
            if length > self.max_payload:
                self._skip = length
                self._skip_buffered()
                return flags, command, handle, offset, length, None
            if self._end - self._start < length and length > self.inline_max:
                self._deciding = length
                return flags, command, handle, offset, length, None
            header = (flags, command, handle, offset, length)
        length = header[4]
        if self._end - self._start < length:
            self._pending = header
            return None
        self._pending = None
        start = self._start
        self._start += length
        return (
            header[0],
            header[1],
            header[2],
            header[3],
            length,
            memoryview(self._buf)[start : start + length],
        )

    def _skip_buffered(self) -> None:
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n

    # --- a WRITE's payload, by the caller's decision -----------------------------------------------------

    @property
    def deciding(self) -> bool:
        """A WRITE was returned without its payload: call :meth:`stream_payload` or :meth:`skip_payload`."""
        return bool(self._deciding)

    @property
    def streaming(self) -> bool:
        """A taken payload is still coming: take its pieces with :meth:`next_piece`."""
        return bool(self._stream_left)

    def skip_payload(self) -> None:
        """Discard the payload of the WRITE being decided on, as it arrives."""
        self._skip, self._deciding = self._deciding, 0
        self._skip_buffered()

    def stream_payload(self) -> None:
        """Take the payload of the WRITE being decided on, in pieces."""
        self._stream_left, self._deciding = self._deciding, 0

    def skip_rest(self) -> None:
        """Discard what is still to come of the streamed payload (a piece of it failed)."""
        self._skip = self._stream_left - self._fill
        self._stream_left = self._fill = 0
        self._skip_buffered()

    def piece_wanted(self) -> int:
        """How many bytes of piece buffer to attach now, or 0: none needed (no byte of the payload is here
        yet, or a whole piece already is, or the attached buffer has room left).

        Never more than :data:`GROWTH` times the payload bytes received so far: a client that declares a
        long payload and sends little of it makes us hold little. A full buffer too short for the piece
        is replaced by a longer one (:meth:`attach_piece` moves its bytes over).
        """
        if not self._stream_left:
            return 0
        target = min(self._stream_left, self._piece_max)
        piece = self._piece
        if piece is None:
            arrived = self._end - self._start
            return min(target, GROWTH * arrived) if 0 < arrived < target else 0
        if self._fill == len(piece) < target:
            return min(target, GROWTH * self._fill)
        return 0

    def attach_piece(self, buf: bytearray) -> bytearray | None:
        """Receive the payload into ``buf`` (at least as long as :meth:`piece_wanted` said) from now on;
        returns the buffer it replaces (its bytes are copied over), if any."""
        old = self._piece
        assert len(buf) >= self.piece_wanted() > 0 and len(buf) > (len(old) if old is not None else 0)
        if old is not None:
            buf[: self._fill] = old[: self._fill]
        self._piece = buf
        if old is None:
            self._fill = 0
        self._refill()
        return old

    def detach_piece(self) -> bytearray | None:
        """Take back the attached piece buffer once the payload is over (streamed or skipped)."""
        assert not self._stream_left
        piece, self._piece = self._piece, None
        return piece

    def next_piece(self) -> memoryview | None:
        """The next piece of the streamed payload, or None until more of it arrives.

        The view is valid until the next :meth:`get_buffer`.
        """
        left = self._stream_left
        if not left:
            return None
        piece = self._piece
        if piece is None:
            want = min(left, self._piece_max)
            if self._end - self._start < want:
                return None
            start = self._start
            self._start += want
            self._stream_left -= want
            return memoryview(self._buf)[start : start + want]
        target = min(left, self._piece_max)
        if self._fill < target:
            self._refill()
            if self._fill < target:
                return None  # more bytes to come, or a longer buffer (piece_wanted)
        self._stream_left -= target
        self._fill = 0
        return memoryview(piece)[:target]

    def _refill(self) -> None:
        # Payload bytes that landed in our own buffer (before the piece was attached, or since it was last
        # handed out) go into the piece first: later bytes are received into the piece itself.
        piece = self._piece
        assert piece is not None
        n = min(self._end - self._start, min(len(piece), self._stream_left) - self._fill)
        if n > 0:
            piece[self._fill : self._fill + n] = self._buf[self._start : self._start + n]
            self._start += n
            self._fill += n
