"""A private network namespace with a Linux bridge, for VMs with bridged NICs (needs root and ``ip``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BRIDGE = "br-hk"
"""The bridge inside :func:`netns`."""
MAC = "52:54:00:4b:00:02"
"""The MAC the tests give a bridged NIC."""


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS``; its output."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace with bridge :data:`BRIDGE` at 10.99.0.1/24; deleted afterwards."""
    name = f"hk-test-{os.getpid()}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", name, "addr", "add", "10.99.0.1/24", "dev", BRIDGE)
        ip("-n", name, "link", "set", BRIDGE, "up")
        yield name
    finally:
        ip("netns", "del", name, check=False)


def in_netns(tmp_path: Path, ns: str) -> str:
    """A 'python' that runs inside the namespace, for the supervisor."""
    wrapper = tmp_path / "python-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)
