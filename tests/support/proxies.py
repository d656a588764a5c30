"""Relocation proxies for tests: `hikkoshi nbd proxy` as a process, and its status through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.servers import Served, hikkoshi_server


def proxy_args(upstream: str, tmp: Path, *extra: str) -> list[str]:
    """`nbd proxy` options: ``tmp/cache.raw`` caching ``upstream``, control socket ``tmp/px.sock``."""
    return [
        "--upstream",
        upstream,
        "--cache",
        str(tmp / "cache.raw"),
        "--control",
        f"unix:{tmp / 'px.sock'}",
        *extra,
    ]


@contextmanager
def proxy(upstream: str, tmp: Path, *extra: str) -> Iterator[Served]:
    """A relocation proxy process (see :func:`proxy_args`), stopped afterwards."""
    with hikkoshi_server(*proxy_args(upstream, tmp, *extra), command="proxy") as p:
        yield p


def status(tmp: Path) -> dict[str, object]:
    """`hikkoshi nbd status --json` of the proxy whose control socket is in ``tmp``."""
    out = subprocess.run(
        [sys.executable, "-m", "hikkoshi", "nbd", "status", "--control", f"unix:{tmp / 'px.sock'}", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def wait_detached(tmp: Path, timeout: float = 120) -> dict[str, object]:
    """Wait until the proxy in ``tmp`` has everything and released its upstream; its last status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(tmp)
        if s["upstream"] == "detached":
            return s
        time.sleep(0.2)
    raise AssertionError(f"relocation did not finish: {status(tmp)}")
