#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine (root): system packages, .venv, Python packages.
# It says what it does in a few lines; pip's own output goes to a log, shown in full if pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the dashboard's browser tests drive it (Playwright, never its own browser downloads).
APT_PACKAGES=(qemu-utils qemu-system-x86 libnbd-bin nbdkit fio busybox-static openssl iproute2 e2fsprogs
    python3-venv etcd-server chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "setup: system packages present"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# pip with its output in the log: all of it on failure; on success only what is not known noise.
pip_logged() {
    if ! .venv/bin/pip "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: pip $* failed (output above)" >&2
        exit 1
    fi
    # A pip.conf naming local file:// indexes that lack a project makes pip warn once per project
    # it looks up there; harmless (the other indexes have it), and dozens of lines.
    grep -v "^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$" "$log" >&2 ||
        true
}

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv ($("$PY" --version))"
    "$PY" -m venv .venv
fi
# Re-install only when the declared dependencies changed.
stamp=.venv/.hikkoshi-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing hikkoshi and its pinned dependencies into .venv (a minute or two)"
    pip_logged install -q --upgrade pip
    pip_logged install -q -e '.[dev]'
    echo "$want" >"$stamp"
else
    echo "setup: .venv is up to date"
fi
echo "setup: ready (.venv/bin/hikkoshi)"
