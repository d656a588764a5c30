"""``kill_vm`` returns only once nothing of the VM runs or is left: its supervisor, the QEMU and disk
service that follow it, and the runtime directory with their sockets, which the killed supervisor can no
longer remove (a rolled-back migration's destination is removed this way, and must be clean). A stand-in
supervisor holds the run lock and records a child that outlives the kernel's SIGTERM for a while, as a
QEMU busy flushing could, and its runtime directory with a socket."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hikkoshi.daemons import supervisor_client
from hikkoshi.daemons.entry import SUPERVISOR
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.procs import alive

# Holds the run lock, starts a child that asks for SIGTERM when we die but ignores it, records both as a
# supervisor does, says so, and waits.
_STAND_IN = """
import ctypes, fcntl, json, os, signal, subprocess, sys, time
home = sys.argv[2]
lock = os.open(os.path.join(home, ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(lock, fcntl.LOCK_EX)
open(os.path.join(home, "supervisor.pid"), "w").write(str(os.getpid()))
libc = ctypes.CDLL(None)
def child_setup():
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=child_setup)
rundir = sys.argv[3]
os.mkdir(rundir)
import socket
sock = socket.socket(socket.AF_UNIX)
sock.bind(os.path.join(rundir, "supervisor.sock"))
state = {"state": "running", "supervisor_pid": os.getpid(), "qemu_pid": child.pid, "rundir": rundir}
open(os.path.join(home, "state.json"), "w").write(json.dumps(state))
print("ready", flush=True)
time.sleep(600)
"""


def test_kill_vm_returns_once_the_children_are_gone_too(tmp_path: Path) -> None:
    home = VmHome(tmp_path / "vm")
    home.path.mkdir()
    rundir = tmp_path / "run"
    cmd = [sys.executable, "-c", _STAND_IN, SUPERVISOR, str(home.path), str(rundir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        child = int(home.read_state()["qemu_pid"])
        assert alive(child) and home.is_running()
        t0 = time.monotonic()
        assert supervisor_client.kill_vm(home, children_grace=1.0)
        assert not home.is_running()
        assert not alive(child), "kill_vm returned while the VM's QEMU still ran"
        assert not rundir.exists(), "the killed supervisor's sockets are left behind"
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()
        child_pid = home.read_state().get("qemu_pid")
        if child_pid and alive(int(child_pid)):
            subprocess.run(["kill", "-9", str(child_pid)], check=False)
