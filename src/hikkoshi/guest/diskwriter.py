"""The ``diskwriter`` guest workload and its host-side verifier.

The guest writes 64 KiB records into a ring of ``slots`` records at the start of its disk, one at a
time, each with ``O_DIRECT`` and a flush, until it is told to stop (ACPI power button, a record or
time limit). Record ``seq`` goes to slot ``seq % slots``. A record is a 256-byte text header naming
the run, the sequence number, the slot and the SHA-256 of the payload, then 65,280 random bytes.

The guest re-verifies as it goes: it reads every record back (``O_DIRECT``) and compares it with
what it meant to write, and every ``scrub`` records it compares the whole ring on the disk with its
copy in memory. When it boots on a disk that already holds records of its run it checks them all
(checksums, positions, no record missing) and continues after the last one, so a stop and restart
is verified by the guest itself. Console lines (``HIKKOSHI-DISKWRITER ...``):

- ``READY run=R next=N slots=S`` once it starts writing; ``RESUME run=R last=M records=K torn=T OK``
  before that when it found earlier records;
- ``PROGRESS run=R durable=D written=W kbps=K``: records up to ``D`` are flushed to the disk;
- ``DONE run=R last=D written=W records=K OK`` after a clean stop and a final full comparison;
- ``FAIL run=R reason=...`` on any mismatch.

:func:`verify_diskwriter_image` checks the same things from the host, on the image file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

TAG = "HIKKOSHI-DISKWRITER"
RECORD_SIZE = 65536
HEADER_SIZE = 256
PAYLOAD_SIZE = RECORD_SIZE - HEADER_SIZE
DEFAULT_SLOTS = 128
"""Ring size unless ``hikkoshi.slots`` says otherwise: 8 MiB of disk (and of guest memory)."""

_HEADER_TEXT_LEN = 138  # "HIKKOSHI-DISKWRITER v1 run=%010d seq=%010d slot=%08d sha256=%64s"
_HEADER_RE = re.compile(
    rb"HIKKOSHI-DISKWRITER v1 run=(\d{10}) seq=(\d{10}) slot=(\d{8}) sha256=([0-9a-f]{64}) {117}\n"
)

SCRIPT = r"""# diskwriter: write self-checking records to a ring on the disk until stopped; see
# hikkoshi.guest.diskwriter for the format. Parameters: hikkoshi.disk (/dev/vda), hikkoshi.run,
# hikkoshi.slots, hikkoshi.records and hikkoshi.seconds (limits for this boot; 0: none),
# hikkoshi.progress (records between PROGRESS lines), hikkoshi.scrub (records between full
# comparisons), hikkoshi.resume (1: continue a run found on the disk, 0: start over).
. /hikkoshi/lib.sh
tag=HIKKOSHI-DISKWRITER
dev=${HIKKOSHI_DISK:-/dev/vda}
run=${HIKKOSHI_RUN:-1}
slots=${HIKKOSHI_SLOTS:-@SLOTS@}
limit=${HIKKOSHI_RECORDS:-0}
seconds=${HIKKOSHI_SECONDS:-0}
progress=${HIKKOSHI_PROGRESS:-8}
scrub=${HIKKOSHI_SCRUB:-64}
resume=${HIKKOSHI_RESUME:-1}
fail() {
    echo "$tag FAIL run=$run $*"
    exit 1
}
for v in "$run" "$slots" "$limit" "$seconds" "$progress" "$scrub" "$resume"; do
    is_number "$v" || fail "reason=bad-parameter value=$v"
done
decimal run "$run"
decimal slots "$slots"
[ "$run" -lt 2147483648 ] || fail "reason=bad-run"
[ "$slots" -gt 0 ] && [ "$progress" -gt 0 ] && [ "$scrub" -gt 0 ] || fail "reason=bad-parameter"
R=65536
ring=$((slots * R))
run10=$(printf %010d "$run")
pad=$(printf '%117s' '')
stop=0
trap 'stop=1' TERM INT

wait_path "$dev" || fail "reason=no-device dev=$dev"
size=$(blockdev --getsize64 "$dev") || fail "reason=getsize dev=$dev"
[ "$size" -ge "$ring" ] || fail "reason=disk-too-small size=$size need=$ring"

# The ring as it is on the disk; from here on every write goes to both, so the two must match.
dd if="$dev" of=/tmp/ring bs=$R count="$slots" iflag=direct 2> /tmp/dd.err ||
    fail "reason=read $(tail -n 1 /tmp/dd.err)"

seq=0
records=0
if [ "$resume" = 1 ]; then
    pattern="$tag v1 run=$run10 seq=[0-9]\{10\} slot=[0-9]\{8\} sha256=[0-9a-f]\{64\}"
    grep -o "$pattern" /tmp/ring > /tmp/headers
    max=-1
    bad=
    while read -r line; do
        s=${line#* seq=}
        s=${s%% *}
        decimal s "$s"
        k=${line#* slot=}
        k=${k%% *}
        decimal k "$k"
        [ "$k" -lt "$slots" ] && [ $((s % slots)) -eq "$k" ] || fail "reason=misplaced seq=$s slot=$k"
        head=$(dd if=/tmp/ring bs=256 skip=$((k * 256)) count=1 2> /dev/null | head -c 138)
        [ "$head" = "$line" ] || fail "reason=misplaced seq=$s slot=$k"
        sum=$(dd if=/tmp/ring bs=256 skip=$((k * 256 + 1)) count=255 2> /dev/null | sha256sum)
        if [ "${sum%% *}" != "${line##*sha256=}" ]; then
            bad="$bad $s"
            continue
        fi
        records=$((records + 1))
        eval "seen_$k=$s"
        [ "$s" -le "$max" ] || max=$s
    done < /tmp/headers
    torn=0
    if [ -n "$bad" ]; then
        # Only the record being written when the last boot was cut off may be torn.
        [ "$bad" = " $((max + 1))" ] || fail "reason=checksum seq=$bad"
        torn=1
    fi
    if [ "$max" -ge 0 ]; then
        k=0
        while [ "$k" -lt "$slots" ] && [ "$k" -le "$max" ]; do
            want=$((max - (max - k) % slots))
            eval "got=\${seen_$k:-none}"
            if [ "$got" != "$want" ] && ! { [ "$torn" = 1 ] && [ "$k" -eq $(((max + 1) % slots)) ]; }; then
                fail "reason=lost seq=$want slot=$k found=$got"
            fi
            k=$((k + 1))
        done
        seq=$((max + 1))
        echo "$tag RESUME run=$run last=$max records=$records torn=$torn OK"
    fi
fi

scrub_ring() {
    if ! dd if="$dev" bs=$R count="$slots" iflag=direct 2> /dev/null |
        cmp - /tmp/ring > /tmp/cmp.out 2>&1; then
        at=$(sed -n 's/.* char \([0-9]*\).*/\1/p' /tmp/cmp.out)
        fail "reason=scrub slot=$(((${at:-1} - 1) / R)) $(head -c 200 /tmp/cmp.out)"
    fi
}

uptime_cs
t0=$UPTIME_CS
written=0
durable=$((seq - 1))
echo "$tag READY run=$run next=$seq slots=$slots"
while [ "$stop" = 0 ]; do
    [ "$limit" -eq 0 ] || [ "$written" -lt "$limit" ] || break
    uptime_cs
    [ "$seconds" -eq 0 ] || [ $((UPTIME_CS - t0)) -lt $((seconds * 100)) ] || break
    k=$((seq % slots))
    dd if=/dev/urandom of=/tmp/payload bs=65280 count=1 2> /dev/null || fail "reason=urandom"
    set -- $(sha256sum /tmp/payload)
    printf "$tag v1 run=%010d seq=%010d slot=%08d sha256=%s%s\n" "$run" "$seq" "$k" "$1" "$pad" > /tmp/record
    cat /tmp/payload >> /tmp/record
    dd if=/tmp/record of="$dev" bs=$R seek="$k" oflag=direct conv=notrunc,fsync 2> /tmp/dd.err ||
        fail "reason=write seq=$seq $(tail -n 1 /tmp/dd.err)"
    durable=$seq
    dd if=/tmp/record of=/tmp/ring bs=$R seek="$k" conv=notrunc 2> /dev/null || fail "reason=ring"
    dd if="$dev" of=/tmp/back bs=$R skip="$k" count=1 iflag=direct 2> /dev/null || fail "reason=readback-io"
    cmp -s /tmp/record /tmp/back || fail "reason=readback seq=$seq"
    seq=$((seq + 1))
    written=$((written + 1))
    records=$((seq < slots ? seq : slots))
    if [ $((written % progress)) -eq 0 ]; then
        uptime_cs
        kbps=$((written * 6400 / (UPTIME_CS - t0 + 1)))
        echo "$tag PROGRESS run=$run durable=$durable written=$written kbps=$kbps"
    fi
    [ $((written % scrub)) -ne 0 ] || scrub_ring
done
scrub_ring
echo "$tag DONE run=$run last=$durable written=$written records=$records OK"
""".replace("@SLOTS@", str(DEFAULT_SLOTS))


# --- host side ------------------------------------------------------------------------------------------


def record_header(run: int, seq: int, slot: int, payload_sha256: str) -> bytes:
    """The 256-byte header of a record, as the guest writes it."""
    text = f"{TAG} v1 run={run:010d} seq={seq:010d} slot={slot:08d} sha256={payload_sha256}"
    assert len(text) == _HEADER_TEXT_LEN
    return (text + " " * (HEADER_SIZE - 1 - len(text)) + "\n").encode()


def diskwriter_record(run: int, seq: int, slots: int, payload: bytes) -> bytes:
    """A complete record (for tests and tools that fake a guest's writes)."""
    if len(payload) != PAYLOAD_SIZE:
        raise ValueError(f"payload must be {PAYLOAD_SIZE} bytes, got {len(payload)}")
    return record_header(run, seq, seq % slots, hashlib.sha256(payload).hexdigest()) + payload


class DiskwriterError(Exception):
    """The ring on the disk is not what a diskwriter run leaves behind."""

    def __init__(self, slot: int, reason: str) -> None:
        super().__init__(f"diskwriter slot {slot}: {reason}")
        self.slot = slot
        self.reason = reason


@dataclass(frozen=True)
class DiskwriterReport:
    """What the host found on a diskwriter disk."""

    run: int
    slots: int
    last: int | None
    """Highest sequence number on the disk with a valid record; ``None`` if there is none."""
    records: int
    """Valid records of the run on the disk."""
    torn: bool
    """The record after ``last`` is present but torn (the guest was cut off while writing it)."""


def verify_diskwriter_image(
    image: Path,
    *,
    run: int,
    slots: int = DEFAULT_SLOTS,
    durable: int | None = None,
    allow_torn: bool = False,
) -> DiskwriterReport:
    """Check the ring of diskwriter run ``run`` on ``image``; raise :class:`DiskwriterError` if wrong.

    Every record of the run must sit in its slot with a matching checksum, and every slot must hold
    the latest record that went there (nothing lost, nothing stale). ``durable`` is the last record
    the guest reported as flushed (see :func:`console_durable`): it must be on the disk.
    ``allow_torn`` accepts a damaged record right after the last one, which a guest that was killed
    while writing leaves behind; after a clean stop there is none.
    """
    seen: dict[int, int] = {}
    bad: list[tuple[int, int]] = []  # (slot, seq) of records whose payload does not match
    with image.open("rb") as f:
        for slot in range(slots):
            block = f.read(RECORD_SIZE)
            if len(block) < RECORD_SIZE:
                raise DiskwriterError(slot, f"image ends inside the ring ({len(block)} bytes)")
            header = _HEADER_RE.fullmatch(block[:HEADER_SIZE])
            if header is None or int(header[1]) != run:
                continue  # empty, another run's, or garbage: judged below by what should be here
            seq, where, digest = int(header[2]), int(header[3]), header[4].decode()
            if where != slot or seq % slots != slot:
                raise DiskwriterError(slot, f"record seq={seq} slot={where} is misplaced")
            if hashlib.sha256(block[HEADER_SIZE:]).hexdigest() != digest:
                bad.append((slot, seq))
            else:
                seen[slot] = seq
    last = max(seen.values(), default=None)
    torn = False
    if bad:
        slot, seq = bad[0]
        expected_torn = 0 if last is None else last + 1
        if len(bad) > 1 or seq != expected_torn or not allow_torn:
            raise DiskwriterError(slot, f"record seq={seq} fails its checksum")
        torn = True
    if last is not None:
        torn_slot = (last + 1) % slots
        for slot in range(min(slots, last + 1)):
            want = last - (last - slot) % slots
            got = seen.get(slot)
            if got != want and not (torn and slot == torn_slot):
                raise DiskwriterError(slot, f"holds {got} instead of record {want}")
    if durable is not None and (last is None or last < durable):
        raise DiskwriterError(
            (durable % slots), f"record {durable} was reported durable but the last on disk is {last}"
        )
    return DiskwriterReport(run=run, slots=slots, last=last, records=len(seen), torn=torn)


_DURABLE_RE = re.compile(rf"^{TAG} (?:PROGRESS|DONE) run=(\d+) (?:durable|last)=(-?\d+) ")


def console_durable(console: str, run: int) -> int | None:
    """The highest record the guest reported as flushed for ``run`` on this console output."""
    best: int | None = None
    for line in console.splitlines():
        m = _DURABLE_RE.match(line.strip())
        if m and int(m[1]) == run:
            value = int(m[2])
            if value >= 0 and (best is None or value > best):
                best = value
    return best
