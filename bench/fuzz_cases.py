"""Malformed and hostile NBD client sessions, generated from a seed. Pure: no sockets.

Case ``i`` of seed ``s`` depends on nothing else, so any case a run reports can be made again alone.
The families are those of tests/test_robustness.py's hypothesis fuzz, widened: random bytes; a proper
client flags word then garbage; well-formed sessions (every option, simple or structured replies, meta
contexts, block size constraints asked for or not, NBD_OPT_GO or NBD_OPT_EXPORT_NAME) followed by
requests with boundary fields and payloads that do or do not match their lengths; such sessions with
bytes flipped, set, inserted or deleted; a valid prefix spliced onto random bytes; and options alone,
with boundary lengths and malformed payloads. Any of them may stop part-way, like a client that gives up.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    BASE_ALLOCATION,
    HIKKOSHI_HEAT,
    ClientFlag,
    Command,
    CommandFlag,
    Info,
    Option,
)

MiB = 1 << 20
#: The fuzz image's size: the boundary values below are relative to it.
IMAGE_SIZE = 64 * MiB
EXPORT = "disk"
U64_MAX = (1 << 64) - 1
IHAVEOPT = b"IHAVEOPT"
#: Payload bytes one case sends at most (lengths may declare far more).
MAX_SENT_PAYLOAD = 70_000

OFFSETS = [0, 1, 511, 4096, 4 * MiB, 48 * MiB, IMAGE_SIZE - 4096, IMAGE_SIZE - 1, IMAGE_SIZE, IMAGE_SIZE + 1]
OFFSETS += [1 << 32, 1 << 63, U64_MAX - 4095, U64_MAX]
LENGTHS = [0, 1, 511, 512, 4096, 65535, 65536, 65537, MiB, 4 * MiB + 1, 32 * MiB, 32 * MiB + 1, 48 * MiB]
LENGTHS += [1 << 31, 0xFFFFFFF7, 0xFFFFFFF8, 0xFFFFFFFF]
FLAG_VALUES = [0, *(int(f) for f in CommandFlag), 0xFFFF, 1 << 6, 1 << 15]
CONTEXTS = [BASE_ALLOCATION, HIKKOSHI_HEAT, "hikkoshi:dirty:x", "base:", "", "nope:thing", "\u00e9:x"]
FAMILIES = ("random", "after_flags", "session", "mutated", "spliced", "options")


@dataclass(frozen=True, slots=True)
class Case:
    """One hostile client: what it sends, whether it reads the greeting first, and over which socket."""

    index: int
    family: str
    data: bytes
    read_greeting: bool
    unix: bool


def case(seed: int, index: int) -> Case:
    """Case ``index`` of ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    family = rng.choice(FAMILIES)
    if family == "random":
        data = rng.randbytes(rng.randrange(0, 600))
        read_greeting = rng.random() < 0.5
    elif family == "after_flags":
        data = _client_flags(rng) + rng.randbytes(rng.randrange(0, 600))
        read_greeting = True
    elif family == "session":
        data = _session(rng)
        read_greeting = rng.random() < 0.7
    elif family == "mutated":
        data = _mutate(rng, bytearray(_session(rng, max_requests=4)))
        read_greeting = True
    elif family == "spliced":
        whole = _session(rng, max_requests=4)
        data = whole[: rng.randrange(0, len(whole) + 1)] + rng.randbytes(rng.randrange(0, 300))
        read_greeting = True
    else:
        data = _client_flags(rng) + b"".join(_option(rng) for _ in range(rng.randrange(1, 8)))
        read_greeting = rng.random() < 0.7
    if family != "random" and rng.random() < 0.2:
        data = data[: rng.randrange(0, len(data) + 1)]  # the client gives up half-way
    return Case(index, family, bytes(data), read_greeting, unix=rng.random() < 0.1)


def _client_flags(rng: random.Random) -> bytes:
    flags = rng.choice(
        [
            ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES,
            ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES,
            ClientFlag.FIXED_NEWSTYLE,
            0,
            ClientFlag.NO_ZEROES,
            rng.getrandbits(32),
        ]
    )
    return wire.U32.pack(int(flags))


def _option_header(option: int, length: int) -> bytes:
    return IHAVEOPT + struct.pack(">II", option, length)


def _encoded_option(option: int, payload: bytes = b"") -> bytes:
    return wire.encode_option(wire.OptionRequest(option, payload))


def _info_request(rng: random.Random) -> bytes:
    name = rng.choice([EXPORT, "", "nosuch", "x" * rng.choice([300, 4096, 5000])])
    infos = tuple(rng.choice([Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE, 0, 9, 0xFFFF]) for _ in range(3))
    return wire.encode_info_request(wire.InfoRequest(name, infos[: rng.randrange(0, 4)]))


def _meta_request(rng: random.Random) -> bytes:
    queries = tuple(rng.choice(CONTEXTS) for _ in range(rng.randrange(0, 4)))
    return wire.encode_meta_context_request(
        wire.MetaContextRequest(rng.choice([EXPORT, "", "nosuch"]), queries)
    )


def _option(rng: random.Random) -> bytes:
    """One option, well-formed or not."""
    option = rng.choice([*(int(o) for o in Option), 0, 12, 0x7FFFFFFF, rng.getrandbits(32)])
    roll = rng.random()
    if roll < 0.5:
        if option in (Option.INFO, Option.GO):
            payload = _info_request(rng)
        elif option in (Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT):
            payload = _meta_request(rng)
        elif option == Option.EXPORT_NAME:
            payload = rng.choice([EXPORT.encode(), b"", b"nosuch", b"\xff\xfe"])
        else:
            payload = b""
        if rng.random() < 0.3 and payload:  # damaged
            cut = rng.randrange(0, len(payload))
            payload = payload[:cut] + rng.randbytes(rng.randrange(0, 8))
        return _option_header(option, len(payload)) + payload
    if roll < 0.8:
        # A length that does not match what follows, or is huge.
        length = rng.choice([0, 1, 3, 4, 65536, 65537, 1 << 31, 0xFFFFFFFF])
        return _option_header(option, length) + rng.randbytes(rng.randrange(0, 200))
    return _option_header(option, 8) + rng.randbytes(8)


def _session(rng: random.Random, max_requests: int = 8) -> bytes:
    """A well-formed negotiation (of many kinds), then a stream of requests with extreme fields."""
    out = bytearray(wire.U32.pack(int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)))
    structured = rng.random() < 0.6
    meta = structured and rng.random() < 0.5
    if structured:
        out += _encoded_option(Option.STRUCTURED_REPLY)
    if meta:
        contexts = tuple(rng.sample([BASE_ALLOCATION, HIKKOSHI_HEAT], rng.randrange(1, 3)))
        request = wire.MetaContextRequest(EXPORT, contexts)
        out += wire.encode_option(
            wire.OptionRequest(Option.SET_META_CONTEXT, wire.encode_meta_context_request(request))
        )
    if rng.random() < 0.3:
        out += wire.encode_option(wire.OptionRequest(Option.LIST))
    if rng.random() < 0.2:
        out += wire.encode_option(
            wire.OptionRequest(Option.INFO, wire.encode_info_request(wire.InfoRequest(EXPORT)))
        )
    if rng.random() < 0.15:
        out += _option_header(Option.EXPORT_NAME, len(EXPORT)) + EXPORT.encode()
    else:
        infos = (Info.BLOCK_SIZE,) if rng.random() < 0.4 else rng.choice([(), (Info.NAME, Info.DESCRIPTION)])
        out += wire.encode_option(
            wire.OptionRequest(Option.GO, wire.encode_info_request(wire.InfoRequest(EXPORT, infos)))
        )
    for _ in range(rng.randrange(1, max_requests + 1)):
        out += _request(rng)
    if rng.random() < 0.5:
        out += wire.encode_request(wire.Request(0, Command.DISC, 0, 0, 0))
    return bytes(out)


def _request(rng: random.Random) -> bytes:
    """One request with boundary-value fields, and a payload that may or may not match its length."""
    command = rng.choice([*(int(c) for c in Command), Command.READ, Command.WRITE, rng.getrandbits(16)])
    flags = rng.choice(FLAG_VALUES) if rng.random() < 0.8 else rng.getrandbits(16)
    offset = rng.choice(OFFSETS) if rng.random() < 0.6 else rng.randrange(0, IMAGE_SIZE)
    length = rng.choice(LENGTHS) if rng.random() < 0.6 else rng.randrange(0, 70_000)
    if command == Command.WRITE and rng.random() < 0.3:
        offset = 48 * MiB + rng.randrange(0, 8 * MiB)  # inside the image, where writes are harmless
    handle = rng.choice([0, 1, U64_MAX, rng.getrandbits(64)])
    out = wire.encode_request(wire.Request(flags, command, handle, offset, length))
    if command == Command.WRITE:
        sent = rng.choice([length, length, max(length - 1, 0), length + 28, rng.randrange(0, 4096)])
        out += b"\x5e" * min(sent, MAX_SENT_PAYLOAD)
    return out


def _mutate(rng: random.Random, data: bytearray) -> bytes:
    for _ in range(rng.randrange(1, 7)):
        if not data:
            break
        pos = rng.randrange(0, len(data))
        op = rng.choice(["flip", "set", "insert", "delete"])
        if op == "flip":
            data[pos] ^= 1 << rng.randrange(0, 8)
        elif op == "set":
            data[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(0, 256)])
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        else:
            del data[pos : pos + rng.randrange(1, 9)]
    return bytes(data)
