#!/usr/bin/env bash
# Vendors the dashboard's one JavaScript library into the package (no CDN at run time; works offline):
# uPlot (MIT), a small time-series chart, pinned by version and by the registry's sha512 of its tarball.
# Run by hand when the pin changes; the files it writes are committed.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=uplot
VERSION=1.6.32
INTEGRITY=sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==
DEST=src/hikkoshi/web/static/vendor

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarball=$(cd "$work" && npm pack --silent "$NAME@$VERSION")
got="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | base64 -w0)"
if [ "$got" != "$INTEGRITY" ]; then
    echo "vendor-js: $NAME@$VERSION has $got, expected $INTEGRITY" >&2
    exit 1
fi
tar -xzf "$work/$tarball" -C "$work"
mkdir -p "$DEST"
cp "$work/package/dist/uPlot.iife.min.js" "$DEST/uPlot.iife.min.js"
cp "$work/package/dist/uPlot.min.css" "$DEST/uPlot.min.css"
cp "$work/package/LICENSE" "$DEST/uPlot.LICENSE"
echo "vendor-js: $NAME@$VERSION -> $DEST"
