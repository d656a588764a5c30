"""The README's main command, as written: `hikkoshi demo` live-migrates a real guest and verifies it."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.support.etcd import gone
from tests.support.vms import need_qemu_tools


@pytest.mark.slow
def test_demo_migrates_a_guest_and_verifies_it() -> None:
    need_qemu_tools()
    done = subprocess.run(
        [sys.executable, "-m", "hikkoshi", "demo"], capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "storage hybrid: done" in done.stdout
    assert "now runs on host B; host A's copy is gone" in done.stdout
    assert "two host agents joined the cluster: host-a at https://127.0.0.1:" in done.stdout
    assert "$ hikkoshi migrate demo --to host-b --storage hybrid" in done.stdout
    # The cluster's view: both hosts up, then the VM on host-b; etcd stopped at the end.
    assert re.search(r"^host-a\s+up\s", done.stdout, re.M) and re.search(r"^host-b\s+up\s", done.stdout, re.M)
    assert re.search(r"^demo\s+host-b\s+running\s", done.stdout, re.M), done.stdout
    stopped = re.search(r"stopped etcd at \S+ \(supervisor pid (\d+)\)", done.stdout)
    assert stopped is not None, done.stdout[-2000:]
    deadline = time.monotonic() + 10  # down waited for it; only its reaping may lag
    while not gone(int(stopped[1])):
        assert time.monotonic() < deadline, "etcd's supervisor outlived `cluster down`"
        time.sleep(0.1)
    assert "$ hikkoshi cluster init " in done.stdout and "$ hikkoshi cluster issue host-b " in done.stdout
    assert "encrypted (TLS, host certificates)" in done.stdout
    assert "demo: OK: the guest verified its" in done.stdout
