"""The ``memdirty`` guest workload: dirties guest memory at a given rate, for migration tests.

It mounts a tmpfs holding a working set of ``hikkoshi.mb`` MiB and rewrites it, one MiB at a time
with ``dd``, at ``hikkoshi.rate`` MiB/s (paced against the guest's uptime clock), cycling through
the working set. Pass ``p`` copies a 2 MiB random buffer shifted by ``p`` pages, so every rewrite
changes the page's contents (for 256 passes): QEMU's page-sampling dirty-rate measurement, which
compares page hashes, sees the rewrites too, not only the dirty log. It counts each page once per
measurement, so it shows the full rate only while ``rate * calc-time`` stays below the working set.
When the guest cannot keep up (TCG on a busy host) it writes flat out and says so in its achieved
rate, rather than bursting later to catch up by more than two seconds' worth.

Console lines (``HIKKOSHI-MEMDIRTY ...``): ``READY rate=R mb=M``; ``PROGRESS mib=T seconds=S
rate=X`` every ``hikkoshi.report`` seconds; ``DONE mib=T seconds=S rate=X`` when stopped (ACPI
power button or ``hikkoshi.seconds``); ``FAIL reason=...``. Rates are MiB/s with two decimals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAG = "HIKKOSHI-MEMDIRTY"

SCRIPT = r"""# memdirty: rewrite a tmpfs working set at a given rate; see hikkoshi.guest.memdirty.
# Parameters: hikkoshi.rate (MiB/s, default 10), hikkoshi.mb (working set MiB, default 64),
# hikkoshi.seconds (0: until stopped), hikkoshi.report (seconds between PROGRESS lines).
. /hikkoshi/lib.sh
tag=HIKKOSHI-MEMDIRTY
rate=${HIKKOSHI_RATE:-10}
mb=${HIKKOSHI_MB:-64}
seconds=${HIKKOSHI_SECONDS:-0}
report=${HIKKOSHI_REPORT:-5}
fail() {
    echo "$tag FAIL $*"
    exit 1
}
for v in "$rate" "$mb" "$seconds" "$report"; do
    is_number "$v" || fail "reason=bad-parameter value=$v"
done
decimal rate "$rate"
decimal mb "$mb"
[ "$rate" -gt 0 ] && [ "$mb" -gt 0 ] && [ "$report" -gt 0 ] || fail "reason=bad-parameter"
dir=/run/memdirty
mkdir -p "$dir"
mount -t tmpfs -o size=$((mb + 4))m memdirty "$dir" || fail "reason=mount"
dd if=/dev/urandom of="$dir/src" bs=1048576 count=2 2> /dev/null || fail "reason=urandom"
# Allocate the whole working set first, so the loop rewrites pages the set already owns.
dd if=/dev/zero of="$dir/set" bs=1048576 count="$mb" 2> /dev/null || fail "reason=allocate (guest memory?)"

stop=0
trap 'stop=1' TERM INT
show() {
    el=$((UPTIME_CS - t0))
    r=$((total * 10000 / (el + 1)))
    printf "%s %s mib=%d seconds=%d.%02d rate=%d.%02d\n" "$tag" "$1" "$total" $((el / 100)) $((el % 100)) \
        $((r / 100)) $((r % 100))
}
total=0
skipped=0
pos=0
pass=0
uptime_cs
t0=$UPTIME_CS
shown=$t0
echo "$tag READY rate=$rate mb=$mb"
while [ "$stop" = 0 ]; do
    uptime_cs
    el=$((UPTIME_CS - t0))
    [ "$seconds" -eq 0 ] || [ "$el" -lt $((seconds * 100)) ] || break
    goal=$((el * rate / 100 - skipped))
    if [ $((goal - total)) -gt $((2 * rate)) ]; then
        # More than two seconds behind: forget the backlog instead of bursting to catch up.
        skipped=$((skipped + goal - total - 2 * rate))
        goal=$((total + 2 * rate))
    fi
    if [ "$total" -lt "$goal" ]; then
        n=$((goal - total))
        [ "$n" -le 8 ] || n=8
        i=0
        while [ "$i" -lt "$n" ]; do
            # Pass p copies the source shifted by p pages: a page changes on every pass.
            dd if="$dir/src" of="$dir/set" bs=4096 skip=$((pass % 256)) seek=$((pos * 256)) count=256 \
                conv=notrunc 2> /dev/null || fail "reason=write"
            pos=$((pos + 1))
            if [ "$pos" -ge "$mb" ]; then
                pos=0
                pass=$((pass + 1))
            fi
            i=$((i + 1))
        done
        total=$((total + n))
    else
        # Until the next MiB is due, at most half a second (a stop request waits for this).
        wait_cs=$(((total + skipped + 1) * 100 / rate - el))
        [ "$wait_cs" -le 50 ] || wait_cs=50
        [ "$wait_cs" -ge 1 ] || wait_cs=1
        usleep $((wait_cs * 10000))
    fi
    if [ $((UPTIME_CS - shown)) -ge $((report * 100)) ]; then
        shown=$UPTIME_CS
        show PROGRESS
    fi
done
uptime_cs
show DONE
"""


@dataclass(frozen=True)
class MemdirtyReport:
    """One PROGRESS or DONE line of the guest."""

    kind: str
    mib: int
    seconds: float
    rate: float
    """MiB/s the guest achieved on average since it started."""


_LINE_RE = re.compile(rf"^{TAG} (PROGRESS|DONE) mib=(\d+) seconds=([\d.]+) rate=([\d.]+)$")


def memdirty_reports(console: str) -> list[MemdirtyReport]:
    """Every PROGRESS and DONE line on the console, in order."""
    out = []
    for line in console.splitlines():
        m = _LINE_RE.match(line.strip())
        if m:
            out.append(MemdirtyReport(m[1], int(m[2]), float(m[3]), float(m[4])))
    return out
