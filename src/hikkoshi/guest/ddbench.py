"""The ``ddbench`` guest workload: sequential disk throughput measured inside the guest with dd.

It waits for the disk, prints ``HIKKOSHI-DDBENCH READY`` (the boot is done), fills a buffer of
``hikkoshi.mib`` MiB from ``/dev/urandom`` in guest memory, then for each of ``hikkoshi.rounds``
rounds writes it to the start of the disk (``O_DIRECT``, ``hikkoshi.bs`` KiB per request, one flush
at the end) and reads it back ``hikkoshi.reads`` times (``O_DIRECT``), timing both with the guest's
uptime clock: ``HIKKOSHI-DDBENCH RESULT round=R mib=M write_cs=W read_mib=N read_cs=C``, then
``DONE`` (and the guest powers off). Random data, so that no layer can take a shortcut for zeros.
The clock counts centiseconds, so a round should take well over a tenth of a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAG = "HIKKOSHI-DDBENCH"

SCRIPT = r"""# ddbench: sequential write and read of the disk with dd; see hikkoshi.guest.ddbench.
# Parameters: hikkoshi.disk (/dev/vda), hikkoshi.mib (64), hikkoshi.bs (KiB per request, 1024),
# hikkoshi.rounds (2), hikkoshi.reads (read passes per round, 1).
. /hikkoshi/lib.sh
tag=HIKKOSHI-DDBENCH
dev=${HIKKOSHI_DISK:-/dev/vda}
mib=${HIKKOSHI_MIB:-64}
bs=${HIKKOSHI_BS:-1024}
rounds=${HIKKOSHI_ROUNDS:-2}
reads=${HIKKOSHI_READS:-1}
fail() {
    echo "$tag FAIL $*"
    exit 1
}
for v in "$mib" "$bs" "$rounds" "$reads"; do
    is_number "$v" || fail "reason=bad-parameter value=$v"
done
[ "$mib" -gt 0 ] && [ "$bs" -gt 0 ] && [ $((mib * 1024 % bs)) -eq 0 ] || fail "reason=bad-parameter"
wait_path "$dev" || fail "reason=no-device dev=$dev"
size=$(blockdev --getsize64 "$dev") || fail "reason=getsize"
[ "$size" -ge $((mib * 1048576)) ] || fail "reason=disk-too-small size=$size"
echo "$tag READY dev=$dev mib=$mib bs_kib=$bs"
dd if=/dev/urandom of=/tmp/data bs=1048576 count="$mib" 2> /dev/null || fail "reason=urandom (guest memory?)"
count=$((mib * 1024 / bs))
r=1
while [ "$r" -le "$rounds" ]; do
    uptime_cs
    t0=$UPTIME_CS
    dd if=/tmp/data of="$dev" bs="${bs}k" oflag=direct conv=fsync 2> /tmp/dd.err ||
        fail "reason=write $(tail -n 1 /tmp/dd.err)"
    uptime_cs
    t1=$UPTIME_CS
    p=0
    while [ "$p" -lt "$reads" ]; do
        dd if="$dev" of=/dev/null bs="${bs}k" count="$count" iflag=direct 2> /tmp/dd.err ||
            fail "reason=read $(tail -n 1 /tmp/dd.err)"
        p=$((p + 1))
    done
    uptime_cs
    result="round=$r mib=$mib write_cs=$((t1 - t0)) read_mib=$((mib * reads)) read_cs=$((UPTIME_CS - t1))"
    echo "$tag RESULT $result"
    r=$((r + 1))
done
echo "$tag DONE"
"""


@dataclass(frozen=True)
class DdResult:
    """One round: MiB written and read, and how long each took (guest clock)."""

    round: int
    mib: int
    write_seconds: float
    read_mib: int
    read_seconds: float

    @property
    def write_mib_s(self) -> float:
        """Write throughput."""
        return self.mib / max(self.write_seconds, 0.01)

    @property
    def read_mib_s(self) -> float:
        """Read throughput."""
        return self.read_mib / max(self.read_seconds, 0.01)


_RESULT_RE = re.compile(rf"^{TAG} RESULT round=(\d+) mib=(\d+) write_cs=(\d+) read_mib=(\d+) read_cs=(\d+)$")


def ddbench_results(console: str) -> list[DdResult]:
    """The RESULT lines of a console, in order."""
    out = []
    for line in console.splitlines():
        m = _RESULT_RE.match(line.strip())
        if m:
            out.append(DdResult(int(m[1]), int(m[2]), int(m[3]) / 100, int(m[4]), int(m[5]) / 100))
    return out
