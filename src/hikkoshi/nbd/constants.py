"""Numbers of the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md)."""

from __future__ import annotations

import enum

# Handshake magics.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

# Transmission magics.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
CHUNK_HEADER_SIZE = 20
OPTION_HEADER_SIZE = 16  # IHAVEOPT, option, length
OPTION_REPLY_HEADER_SIZE = 20  # magic, option, reply type, length

# Limits we enforce on the peer. Strings are capped by the spec at 4096 bytes.
MAX_STRING = 4096
MAX_OPTION_LENGTH = 65536
#: Largest payload the spec says must not be treated as an attack (2^25).
MAX_PAYLOAD = 32 * 1024 * 1024
#: Largest read that must be served unfragmented with DF.
DF_MIN_SUPPORTED = 65536


class HandshakeFlag(enum.IntFlag):
    """Global flags the server sends after NBDMAGIC/IHAVEOPT."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags answering the server's handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export flags sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    """Option haggling commands (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types (NBD_REP_*); values with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


def is_option_error(reply_type: int) -> bool:
    """Whether an option reply type is an error (bit 31 set)."""
    return bool(reply_type & _REP_ERR)


class Info(enum.IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission commands (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """Command flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


def is_error_chunk(chunk_type: int) -> bool:
    """Whether a chunk type is an error chunk (bit 15 set)."""
    return bool(chunk_type & (1 << 15))


class Errno(enum.IntEnum):
    """Error values carried in replies; the same numbers as Linux errno."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationFlag(enum.IntFlag):
    """Status bits of the base:allocation meta context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
#: Our own meta context: per-region access counts of an export (reads + writes, saturated at 2^32-1), so a
#: relocation proxy can copy what the guest uses most first.
HIKKOSHI_HEAT = "hikkoshi:heat"

#: Which command flags each command accepts; anything else is EINVAL. Plain ints on purpose: ``~`` of an
#: IntFlag member keeps only the defined bits, which would let unknown flag bits through.
ALLOWED_FLAGS: dict[int, int] = {
    Command.READ: int(CommandFlag.DF),
    Command.WRITE: int(CommandFlag.FUA),
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: int(CommandFlag.FUA),
    Command.CACHE: 0,
    Command.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
    Command.BLOCK_STATUS: int(CommandFlag.REQ_ONE),
}
