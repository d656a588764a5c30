"""The README's main command, as written: `hikkoshi demo` live-migrates a real guest and verifies it."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    assert "$ hikkoshi cluster init " in done.stdout and "$ hikkoshi cluster issue host-b " in done.stdout
    assert "two host agents run: host-a at https://127.0.0.1:" in done.stdout
    assert "$ hikkoshi --agent https://127.0.0.1:" in done.stdout
    assert "encrypted (TLS, host certificates)" in done.stdout
    assert "demo: OK: the guest verified its" in done.stdout
