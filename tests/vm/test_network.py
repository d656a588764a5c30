"""A bridged NIC for real: a tap on a Linux bridge in a private network namespace.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and ``ip``; skipped otherwise. The supervisor, and
so the tap and QEMU, run inside the namespace; the host side (the bridge's address, the client)
too. The namespace is deleted afterwards whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.tap import tap_mac, tap_name
from tests.support import vms
from tests.support.netns import BRIDGE, MAC, in_netns, ip
from tests.support.netns import netns as netns
from tests.support.vms import guest_vm, running, stop, wait_console

guest = vms.guest
store = vms.store
short_runtime_dir = vms.short_runtime_dir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for network namespaces"
)


@pytest.mark.slow
def test_bridged_nic_keeps_its_mac_and_serves(
    store: Datastore, guest: GuestImage, netns: str, tmp_path: Path
) -> None:
    home = guest_vm(
        store,
        guest,
        "bridged",
        "tcpservice",
        {"ip": "10.99.0.2/24"},
        disks=[],
        nics=[{"network": f"bridge:{BRIDGE}", "mac": MAC}],
    )
    with running(home, python=in_netns(tmp_path, netns)) as info:
        tap = info["taps"]["0"]
        assert tap == tap_name(home.load_spec().uuid, 0, os.environ["HIKKOSHI_RUNTIME_DIR"])
        ready = wait_console(home, r"HIKKOSHI-TCPSERVICE READY port=7777 ip=10.99.0.2/24 boot=(\S+)")
        link = ip("-n", netns, "-o", "link", "show", "dev", tap)
        assert f"master {BRIDGE}" in link and tap_mac(MAC) in link

        client = subprocess.run(
            [
                "ip", "netns", "exec", netns, sys.executable, "-c",
                "from hikkoshi.guest.tcpservice import TcpServiceClient\n"
                "with TcpServiceClient('10.99.0.2', 7777, timeout=30) as c:\n"
                "    print(c.boot, c.echo('over the bridge'), c.echo('again'))\n",
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == [ready[1], "1", "2"]
        # The guest answered from the MAC of its spec, and the bridge learnt it on the VM's tap.
        assert MAC in ip("-n", netns, "neigh", "show", "10.99.0.2")
        fdb = subprocess.run(
            ["bridge", "-n", netns, "fdb", "show", "dev", tap], capture_output=True, text=True, check=True
        ).stdout
        assert MAC in fdb
        stop(home, hard=True)
    assert ip("-n", netns, "link", "show", "dev", tap, check=False) == ""  # the tap went with the VM
