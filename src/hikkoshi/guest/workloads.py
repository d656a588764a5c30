"""What runs inside the test guest: its ``/init``, the workloads, and the host side of their formats.

The guest is busybox only, so workloads are shell scripts (plus helper files such as awk programs)
placed under ``/hikkoshi`` in the initramfs, with shared helpers in ``/hikkoshi/lib.sh``
(:mod:`hikkoshi.guest.guest_lib`). ``/init`` loads the kernel modules, turns every
``hikkoshi.<key>=<value>`` on the kernel command line into ``HIKKOSHI_<KEY>=<value>`` in the
environment, runs ``/hikkoshi/workloads/$HIKKOSHI_WORKLOAD`` and powers the guest off when the
workload ends. Results are single lines on the serial console starting with ``HIKKOSHI-``.

Stopping: the ACPI power button (QMP ``system_powerdown``) reaches busybox ``acpid``, which signals
``/init``; ``/init`` sends SIGTERM to the workload, waits for it (``hikkoshi.stop_grace`` seconds
at most, default 30, then SIGKILL) and powers off. Long-running workloads trap SIGTERM to finish
cleanly and print a final line (diskwriter verifies everything it wrote first).

Workloads: ``idle``, ``diskcheck`` (here), ``diskwriter`` (:mod:`hikkoshi.guest.diskwriter`),
``memdirty`` (:mod:`hikkoshi.guest.memdirty`), ``tcpservice`` (:mod:`hikkoshi.guest.tcpservice`),
``ddbench`` (:mod:`hikkoshi.guest.ddbench`). To add one, add a :class:`Workload` to
:data:`WORKLOADS`; the guest image cache key covers every script, so the next
:func:`hikkoshi.guest.guest_image.build_guest` rebuilds the initramfs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from hikkoshi.guest import ddbench, diskwriter, memdirty, tcpservice
from hikkoshi.guest.guest_lib import LIB_PATH, LIB_SCRIPT

BLOCK_SIZE = 4096
"""Size of one diskcheck record: 64 lines of 63 characters and a newline."""

DISKCHECK_DEFAULT_BLOCKS = 1024
"""Records diskcheck writes unless ``hikkoshi.blocks`` says otherwise (4 MiB)."""

_LINE = 64
_PAYLOAD_LINES = 62
_MODULUS = 2**31 - 1  # Park-Miller "minimal standard" generator: exact in awk's doubles
_MULTIPLIER = 48271

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the hikkoshi test guest (built by hikkoshi.guest.guest_image).
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /run /etc/acpi/PWRF
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "HIKKOSHI-INIT start"

# Modules come in dependency order (resolved at build time); insmod needs no modules.dep.
while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "HIKKOSHI-INIT WARN insmod $module failed"
done < /lib/modules/load-order
# From here on kernel messages stay in dmesg: on the console they could split a result line.
dmesg -n 1
ip link set lo up

# hikkoshi.<key>=<value> on the kernel command line becomes HIKKOSHI_<KEY>=<value>.
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    hikkoshi.*=*)
        key=${arg%%=*}
        key=${key#hikkoshi.}
        case "$key" in *[!a-z0-9_]*) continue ;; esac
        export "HIKKOSHI_$(echo "$key" | tr a-z A-Z)=${arg#*=}"
        ;;
    esac
done

# The ACPI power button (QMP system_powerdown) asks for a clean stop: busybox acpid runs this
# handler, which signals init the way busybox poweroff does.
printf '#!/bin/sh\nkill -USR2 1\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /tmp/acpid.log -p /tmp/acpid.pid || echo "HIKKOSHI-INIT WARN no acpid"

stopping=0
stop_workload() {
    [ "$stopping" = 0 ] || return 0
    stopping=1
    echo "HIKKOSHI-INIT stop requested"
    kill -TERM "$wpid" 2>/dev/null
    # A workload that does not end in time is killed, so a power-off request stays bounded.
    (sleep "${HIKKOSHI_STOP_GRACE:-30}"; kill -KILL "$wpid" 2>/dev/null) &
}

workload=${HIKKOSHI_WORKLOAD:-idle}
case "$workload" in *[!a-z0-9_-]*) workload=invalid ;; esac
if [ -f "/hikkoshi/workloads/$workload" ]; then
    echo "HIKKOSHI-INIT workload=$workload"
    # In the background so that the trapped stop signals interrupt `wait` (a foreground command
    # would hold them back until it ended).
    trap stop_workload USR2 TERM INT
    sh "/hikkoshi/workloads/$workload" &
    wpid=$!
    status=0
    # wait also returns (with 128+signal) when a trap ran: go on while the workload is there.
    while kill -0 "$wpid" 2>/dev/null; do
        wait "$wpid"
        status=$?
    done
    # The shell may have reaped the workload while a trap ran; then this wait returns its status
    # (and 127 if the loop's wait already collected it).
    wait "$wpid"
    last=$?
    [ "$last" -eq 127 ] || status=$last
else
    echo "HIKKOSHI-INIT FAIL unknown workload $workload"
    status=127
fi
if [ "$status" -ne 0 ] && [ "$stopping" = 0 ]; then
    echo "HIKKOSHI-INIT dmesg tail:"
    dmesg | tail -n 40
fi
echo "HIKKOSHI-INIT end status=$status"
sync
poweroff -f
"""

_IDLE_SCRIPT = r"""# idle: announce readiness and do nothing (a VM to migrate that only has to stay alive).
# hikkoshi.seconds=N ends the workload (and so powers off) after N seconds; so does a stop request.
. /hikkoshi/lib.sh
trap 'echo "HIKKOSHI-IDLE STOPPED"; exit 0' TERM
echo "HIKKOSHI-IDLE READY"
if [ -n "$HIKKOSHI_SECONDS" ]; then
    nap "$HIKKOSHI_SECONDS"
    exit 0
fi
while :; do nap 3600; done
"""

_DISKCHECK_AWK = r"""# Writes `total` diskcheck records to stdout (Python twin: diskcheck_block).
# Record = 64 lines of 63 characters and a newline (4096 bytes): a header; 62 payload lines, each
# naming its record and line and carrying one word of a Park-Miller generator seeded by (run, seq);
# a footer with Fletcher sums of the 62 words. One generator step and one printf per line: under
# TCG every awk statement is expensive, and 4 MiB of this takes seconds already.
BEGIN {
    M = 2147483647
    for (seq = 0; seq < total; seq++) {
        x = (run * 7919 + seq * 104729 + 1) % M
        if (x == 0) x = 1
        s1 = 0
        s2 = 0
        printf "%-63s\n", sprintf("HIKKOSHI-DISKCHECK v1 run=%010d seq=%08d of=%08d", run, seq, total)
        for (l = 1; l <= 62; l++) {
            x = (x * 48271) % M
            s1 = (s1 + x) % M
            s2 = (s2 + s1) % M
            printf "seq=%08d line=%02d word=%08x dec=%010d              \n", seq, l, x, x
        }
        printf "%-63s\n", sprintf("sum1=%08x sum2=%08x end", s1, s2)
    }
}
"""

_DISKCHECK_SCRIPT = r"""# diskcheck: write records to the disk, sync, drop caches, read back and compare.
# Parameters: hikkoshi.blocks (4 KiB records), hikkoshi.run (a number < 2^31 naming this run),
# hikkoshi.disk (device, default /dev/vda). Prints one HIKKOSHI-DISKCHECK OK/FAIL line.
dev=${HIKKOSHI_DISK:-/dev/vda}
blocks=${HIKKOSHI_BLOCKS:-@DEFAULT_BLOCKS@}
run=${HIKKOSHI_RUN:-1}
fail() {
    echo "HIKKOSHI-DISKCHECK FAIL $*"
    exit 1
}
case "$blocks" in '' | *[!0-9]*) fail "reason=bad-blocks blocks=$blocks" ;; esac
case "$run" in '' | *[!0-9]*) fail "reason=bad-run run=$run" ;; esac
# Record headers have room for 8 digits of count; the run id must fit awk's 32-bit %d.
[ "${#blocks}" -le 8 ] && [ "$blocks" -gt 0 ] || fail "reason=bad-blocks blocks=$blocks"
[ "${#run}" -le 10 ] && [ "$run" -lt 2147483648 ] || fail "reason=bad-run run=$run"

# The virtio disk appears asynchronously after virtio_blk is loaded.
tries=0
while [ ! -b "$dev" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 200 ] || fail "reason=no-device dev=$dev"
    usleep 50000
done
size=$(blockdev --getsize64 "$dev") || fail "reason=getsize dev=$dev"
[ "$size" -ge $((blocks * 4096)) ] || fail "reason=disk-too-small size=$size need=$((blocks * 4096))"

now() { cut -d ' ' -f 1 /proc/uptime; }
t0=$(now)
awk -v run="$run" -v total="$blocks" -f /hikkoshi/diskcheck.awk > /tmp/expected ||
    fail "reason=generate"
t1=$(now)
# Large O_DIRECT requests: every request is a slow round trip through QEMU and the NBD server.
dd if=/tmp/expected of="$dev" bs=256k oflag=direct conv=fsync 2> /tmp/dd.err ||
    fail "reason=write $(tail -n 1 /tmp/dd.err)"
sync
t2=$(now)
# Make the read-back come from the disk, not from this guest's page cache.
echo 3 > /proc/sys/vm/drop_caches
blockdev --flushbufs "$dev"
dd if="$dev" of=/tmp/readback bs=256k count=$((blocks * 4096)) iflag=direct,count_bytes 2> /tmp/dd.err ||
    fail "reason=read $(tail -n 1 /tmp/dd.err)"
t3=$(now)
echo "diskcheck: generate $t0..$t1 write ..$t2 read ..$t3 (guest uptime, s)"
got=$(wc -c < /tmp/readback)
[ "$got" -eq $((blocks * 4096)) ] || fail "reason=short-read bytes=$got"
if ! cmp -s /tmp/expected /tmp/readback; then
    first=$(cmp -l /tmp/expected /tmp/readback 2> /dev/null | head -n 1 | awk '{print $1}')
    fail "reason=mismatch block=$(((first - 1) / 4096)) byte=$((first - 1))"
fi
echo "HIKKOSHI-DISKCHECK OK blocks=$blocks run=$run"
""".replace("@DEFAULT_BLOCKS@", str(DISKCHECK_DEFAULT_BLOCKS))


_BUSY_SCRIPT = r"""# busy: the disk writer and the memory dirtier at once (a guest worth migrating).
# Parameters are theirs (hikkoshi.rate, hikkoshi.mb for memdirty; hikkoshi.run, ... for diskwriter).
sh /hikkoshi/workloads/memdirty &
mpid=$!
sh /hikkoshi/workloads/diskwriter &
dpid=$!
trap 'kill -TERM $mpid $dpid 2>/dev/null' TERM INT
status=0
for pid in $dpid $mpid; do
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid"
        code=$?
    done
    wait "$pid"
    last=$?
    [ "$last" -eq 127 ] || code=$last
    [ "$code" -eq 0 ] || status=$code
done
exit $status
"""


@dataclass(frozen=True)
class Workload:
    """A guest workload: ``script`` runs as ``/hikkoshi/workloads/<name>`` under busybox ``sh``.

    ``files`` are extra files the script uses, placed at ``/hikkoshi/<relative path>``.
    """

    name: str
    description: str
    script: str
    files: Mapping[str, str] = field(default_factory=dict)


WORKLOADS: Mapping[str, Workload] = MappingProxyType(
    {
        "idle": Workload("idle", "stays up doing nothing; prints HIKKOSHI-IDLE READY", _IDLE_SCRIPT),
        "diskcheck": Workload(
            "diskcheck",
            "writes, re-reads and verifies records on /dev/vda; prints HIKKOSHI-DISKCHECK OK/FAIL",
            _DISKCHECK_SCRIPT,
            {"diskcheck.awk": _DISKCHECK_AWK},
        ),
        "diskwriter": Workload(
            "diskwriter",
            "writes self-checking records to a ring on /dev/vda until stopped, re-verifying them",
            diskwriter.SCRIPT,
        ),
        "memdirty": Workload(
            "memdirty", "rewrites a tmpfs working set at hikkoshi.rate MiB/s until stopped", memdirty.SCRIPT
        ),
        "busy": Workload(
            "busy", "diskwriter and memdirty at once, both stopped by the power button", _BUSY_SCRIPT
        ),
        "ddbench": Workload(
            "ddbench",
            "times sequential O_DIRECT writes and reads of /dev/vda with dd, then powers off",
            ddbench.SCRIPT,
        ),
        "tcpservice": Workload(
            "tcpservice",
            "TCP echo and line counter on hikkoshi.port (7777), for connection-survival checks",
            tcpservice.SCRIPT,
            {tcpservice.HANDLER_PATH: tcpservice.HANDLER},
        ),
    }
)
"""Every workload the guest image carries, by the name given as ``hikkoshi.workload``."""

GUEST_FILES: Mapping[str, str] = MappingProxyType({LIB_PATH: LIB_SCRIPT})
"""Files every workload may use, placed at ``/hikkoshi/<relative path>``."""

READY_TAGS: Mapping[str, str] = MappingProxyType(
    {
        "idle": "HIKKOSHI-IDLE READY",
        "diskwriter": f"{diskwriter.TAG} READY",
        "memdirty": f"{memdirty.TAG} READY",
        "tcpservice": f"{tcpservice.TAG} READY",
        "ddbench": f"{ddbench.TAG} READY",
        "busy": f"{diskwriter.TAG} READY",
    }
)
"""The console line (prefix) a long-running workload prints once it is doing its work."""


def console_result(console: str, tag: str) -> str | None:
    """The last console line starting with ``tag`` (e.g. ``"HIKKOSHI-DISKCHECK"``), stripped."""
    found = None
    for line in console.splitlines():
        line = line.strip()
        if line.startswith(tag + " ") or line == tag:
            found = line
    return found


# --- diskcheck, host side -------------------------------------------------------------------------------


def _words(run: int, seq: int) -> Iterator[int]:
    x = (run * 7919 + seq * 104729 + 1) % _MODULUS or 1
    for _ in range(_PAYLOAD_LINES):
        x = x * _MULTIPLIER % _MODULUS
        yield x


def _fletcher(words: list[int]) -> tuple[int, int]:
    s1 = s2 = 0
    for word in words:
        s1 = (s1 + word) % _MODULUS
        s2 = (s2 + s1) % _MODULUS
    return s1, s2


def _check_run(run: int) -> None:
    # The guest's awk prints with %d, which busybox clamps to a signed 32-bit int.
    if not 0 <= run < 2**31:
        raise ValueError(f"diskcheck run id must be in [0, 2**31), got {run}")


def diskcheck_block(run: int, seq: int, total: int) -> bytes:
    """The 4096-byte record the guest writes as block ``seq`` of ``total`` in run ``run``."""
    _check_run(run)
    words = list(_words(run, seq))
    lines = [f"HIKKOSHI-DISKCHECK v1 run={run:010d} seq={seq:08d} of={total:08d}"]
    lines += [f"seq={seq:08d} line={i:02d} word={w:08x} dec={w:010d}" for i, w in enumerate(words, 1)]
    s1, s2 = _fletcher(words)
    lines.append(f"sum1={s1:08x} sum2={s2:08x} end")
    block = "".join(f"{line:<63}\n" for line in lines).encode()
    assert len(block) == BLOCK_SIZE
    return block


class DiskcheckError(Exception):
    """A diskcheck record on the disk is missing, damaged or from another run."""

    def __init__(self, block: int, reason: str) -> None:
        super().__init__(f"diskcheck block {block}: {reason}")
        self.block = block
        self.reason = reason


_HEADER_RE = re.compile(rb"HIKKOSHI-DISKCHECK v1 run=(\d{10}) seq=(\d{8}) of=(\d{8}) *\n")
_FOOTER_RE = re.compile(rb"sum1=([0-9a-f]{8}) sum2=([0-9a-f]{8}) end *\n")
_PAYLOAD_RE = re.compile(rb"seq=(\d{8}) line=(\d{2}) word=([0-9a-f]{8}) dec=(\d{10}) *\n")


def check_diskcheck_block(block: bytes, *, run: int, seq: int, total: int) -> None:
    """Parse one record and check it field by field; raise :class:`DiskcheckError` if it is wrong.

    Checks the header (run, sequence number, count), that the footer's sums match the payload
    words actually stored, and that the words are the ones this (run, seq) generates.
    """
    _check_run(run)
    if len(block) != BLOCK_SIZE:
        raise DiskcheckError(seq, f"short block ({len(block)} bytes)")
    lines = [block[i : i + _LINE] for i in range(0, BLOCK_SIZE, _LINE)]
    header = _HEADER_RE.fullmatch(lines[0])
    if header is None:
        raise DiskcheckError(seq, f"no record header (starts {block[:24]!r})")
    got = tuple(int(g) for g in header.groups())
    if got != (run, seq, total):
        raise DiskcheckError(seq, f"header says run={got[0]} seq={got[1]} of={got[2]}")
    words: list[int] = []
    for i, line in enumerate(lines[1:-1], start=1):
        payload = _PAYLOAD_RE.fullmatch(line)
        if payload is None:
            raise DiskcheckError(seq, f"payload line {i} malformed: {line!r}")
        # Each line names its record and position, so a misplaced sector shows up here.
        if (int(payload[1]), int(payload[2])) != (seq, i):
            raise DiskcheckError(seq, f"line {i} belongs to record {int(payload[1])} line {int(payload[2])}")
        if int(payload[3], 16) != int(payload[4]):
            raise DiskcheckError(seq, f"line {i} hex and decimal words differ")
        words.append(int(payload[3], 16))
    footer = _FOOTER_RE.fullmatch(lines[-1])
    if footer is None:
        raise DiskcheckError(seq, f"footer malformed: {lines[-1]!r}")
    if (int(footer[1], 16), int(footer[2], 16)) != _fletcher(words):
        raise DiskcheckError(seq, "checksum mismatch")
    if words != list(_words(run, seq)):
        raise DiskcheckError(seq, "payload is not this record's sequence")


def verify_diskcheck_image(image: Path, *, run: int, blocks: int) -> int:
    """Check that ``image`` starts with the ``blocks`` records of diskcheck run ``run``.

    Returns the number of records verified; raises :class:`DiskcheckError` at the first bad one.
    """
    with image.open("rb") as f:
        for seq in range(blocks):
            check_diskcheck_block(f.read(BLOCK_SIZE), run=run, seq=seq, total=blocks)
    return blocks
