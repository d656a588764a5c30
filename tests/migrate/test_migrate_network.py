"""A VM with a bridged NIC migrates inside a private network namespace (two local "hosts" on one
bridge): it keeps its MAC, QEMU announces it from the destination (RARP), the bridge learns its new
port, and an open TCP connection to the guest survives the move."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.vm.datastore import Datastore
from tests.support.migrations import cleanup, hosts
from tests.support.netns import BRIDGE, MAC, in_netns, ip, netns
from tests.support.vms import guest, guest_vm, running, short_runtime_dir, wait_console

__all__ = ["guest", "hosts", "netns", "short_runtime_dir"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

_SNIFFER = textwrap.dedent(
    """
    import os, socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))  # RARP only
    s.bind((sys.argv[1], 0))
    s.settimeout(0.2)
    print("ready", flush=True)
    mac = bytes.fromhex(sys.argv[2].replace(":", ""))
    seen = 0
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline and not os.path.exists(sys.argv[4]):
        try:
            frame = s.recv(2048)
        except TimeoutError:
            continue
        if frame[6:12] == mac:
            seen += 1
    print(seen, flush=True)
    """
)

_CLIENT = textwrap.dedent(
    """
    import sys
    from hikkoshi.guest.tcpservice import TcpServiceClient
    with TcpServiceClient("10.99.0.2", 7777, timeout=60) as c:
        print(c.boot, c.echo("before"), flush=True)
        sys.stdin.readline()  # the migration happens here
        print(c.echo("after"), flush=True)
    """
)


@pytest.mark.slow
def test_bridged_vm_keeps_its_identity_and_connections(
    guest: GuestImage, hosts: tuple[Datastore, Datastore, Path], netns: str, tmp_path: Path
) -> None:
    a, b, runtime_b = hosts
    home = guest_vm(
        a,
        guest,
        "web",
        "tcpservice",
        {"ip": "10.99.0.2/24"},
        nics=[{"network": f"bridge:{BRIDGE}", "mac": MAC}],
    )
    dest = b.home("web")
    in_ns = ["ip", "netns", "exec", netns, sys.executable]
    with running(home, python=in_netns(tmp_path, netns)) as info, cleanup(dest):
        ready = wait_console(home, r"HIKKOSHI-TCPSERVICE READY port=7777 ip=10.99.0.2/24 boot=(\S+)")
        source_tap = info["taps"]["0"]
        client = subprocess.Popen(
            [*in_ns, "-c", _CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        stop_file = tmp_path / "stop-sniffing"
        sniffer = subprocess.Popen(
            [*in_ns, "-c", _SNIFFER, BRIDGE, MAC, "120", str(stop_file)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None and sniffer.stdout is not None and client.stdin is not None
            assert client.stdout.readline().split() == [ready[1], "1"]
            assert sniffer.stdout.readline().strip() == "ready"
            cmd = [*in_ns, "-m", "hikkoshi", "migrate", "web", "--datastore", str(a.path)]
            cmd += ["--to-datastore", str(b.path), "--to-runtime-dir", str(runtime_b), "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            dest_tap = dest.read_state()["taps"]["0"]
            assert dest_tap != source_tap
            # The same connection, now served by the guest on the destination.
            client.stdin.write("\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "2"
            # QEMU announced the VM's MAC from its new port; the bridge knows it there.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                fdb = subprocess.run(
                    ["bridge", "-n", netns, "fdb", "show", "dev", dest_tap], capture_output=True, text=True
                ).stdout
                if MAC in fdb:
                    break
                time.sleep(0.1)
            assert MAC in fdb
            gone = ip("-n", netns, "link", "show", "dev", source_tap, check=False)
            assert gone == ""  # the source's tap went with its QEMU
            time.sleep(1.0)  # announce-self repeats for half a second
        finally:
            client.kill()
            stop_file.touch()
            out, _ = sniffer.communicate(timeout=30)
            client.wait(timeout=30)
        assert int(out.strip().splitlines()[-1]) >= 1, out  # at least one RARP from the VM's MAC
