#!/usr/bin/env bash
# The whole test suite (the README's test command runs this after set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/pytest -q --durations=30 "$@"
