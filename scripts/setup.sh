#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine (root): system packages, .venv, Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-utils qemu-system-x86 libnbd-bin nbdkit fio busybox-static openssl iproute2 e2fsprogs etcd-server)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Re-install only when the declared dependencies changed.
stamp=.venv/.hikkoshi-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi
echo "setup: ready (.venv/bin/hikkoshi)"
