"""Shell helpers shared by the guest workloads, installed as ``/hikkoshi/lib.sh`` in the initramfs.

Workloads source it (``. /hikkoshi/lib.sh``). Under TCG every fork and exec of busybox costs
milliseconds, so the helpers use shell builtins where they can and hand results back in variables
instead of through ``$(...)``, which would fork a subshell.
"""

from __future__ import annotations

LIB_PATH = "lib.sh"
"""Where the library lives, relative to ``/hikkoshi`` in the guest."""

LIB_SCRIPT = r"""# /hikkoshi/lib.sh: helpers for the hikkoshi guest workloads (busybox ash).

# uptime_cs: set UPTIME_CS to the guest's uptime in centiseconds (builtins only).
uptime_cs() {
    read -r _lib_up _lib_idle < /proc/uptime
    # /proc/uptime always has two decimals; "1xx - 100" keeps a leading zero from meaning octal.
    UPTIME_CS=$((${_lib_up%.*} * 100 + 1${_lib_up#*.} - 100))
}

# decimal NAME DIGITS: set NAME to DIGITS without leading zeros (ash reads 010 as octal).
decimal() {
    _lib_v=$2
    while :; do
        case $_lib_v in
        0?*) _lib_v=${_lib_v#0} ;;
        *) break ;;
        esac
    done
    eval "$1=\$_lib_v"
}

# is_number VALUE: true if VALUE is a non-empty string of at most 10 decimal digits.
is_number() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
    [ "${#1}" -le 10 ]
}

# wait_path PATH: wait up to 10 s for PATH to exist (virtio devices probe asynchronously).
wait_path() {
    _lib_tries=0
    while [ ! -e "$1" ]; do
        _lib_tries=$((_lib_tries + 1))
        [ "$_lib_tries" -le 200 ] || return 1
        usleep 50000
    done
}

# net_up ADDRESS/PREFIX [GATEWAY]: bring up eth0 with a static address (and default route).
net_up() {
    ip link set lo up
    wait_path /sys/class/net/eth0 || return 1
    ip link set eth0 up || return 1
    ip addr add "$1" dev eth0 || return 1
    if [ -n "$2" ]; then
        ip route add default via "$2" || return 1
    fi
}

# nap SECONDS: sleep in a way a trapped signal (the stop request) interrupts at once; a sleep in
# the foreground would hold the trap back until it ends.
nap() {
    sleep "$1" &
    _lib_nap=$!
    wait "$_lib_nap"
    kill "$_lib_nap" 2> /dev/null
}
"""
