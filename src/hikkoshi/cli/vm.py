"""`hikkoshi vm`: create, start, stop, pause, resume, inspect and destroy VMs of a datastore.

Usable without an agent: ``vm start`` launches a supervisor process per VM that owns QEMU and the
NBD service; the other commands talk to it through its control socket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hikkoshi.cli import remote
from hikkoshi.cli.params import parse_params
from hikkoshi.daemons import supervisor_client as control
from hikkoshi.daemons.process import run
from hikkoshi.guest.guest_image import GuestImageError, build_guest
from hikkoshi.guest.guest_vm import create_guest_vm
from hikkoshi.guest.workloads import WORKLOADS
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.errors import VmError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, resolve_machine
from hikkoshi.vm.spec import VmSpec, format_size, parse_spec


def add_parser(top: Any) -> None:
    group = top.add_parser("vm", help="virtual machines").add_subparsers(dest="vm_command", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        p.add_argument("name", metavar="NAME", help="the VM's name")
        p.add_argument(
            "--datastore", type=Path, metavar="PATH", help="the datastore (with --agent: its NAME)"
        )
        p.set_defaults(
            func=func, local_requires=("datastore",), remote=remote.vm_simple, via_cluster=in_cluster
        )
        return p

    p = command("create", create_command, "create a VM: its home, disks and vm.toml")
    p.set_defaults(remote=remote.vm_create)
    p.add_argument("--host", metavar="HOST", help="with --etcd: the cluster host that creates and runs it")
    p.add_argument("--memory", type=int, required=True, metavar="MIB", help="guest memory in MiB")
    p.add_argument("--cpus", type=int, default=1, metavar="N")
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="SIZE[:thick]",
        help="a disk (repeatable): 64M, 10G:thick",
    )
    p.add_argument("--image", type=Path, metavar="F", help="import this image (any qemu-img format) as disk0")
    p.add_argument("--image-format", metavar="FMT", help="the image's format (default: probed)")
    p.add_argument("--kernel", type=Path, metavar="F", help="boot this kernel directly")
    p.add_argument("--initrd", type=Path, metavar="F")
    p.add_argument("--append", metavar="S", help="kernel command line")
    p.add_argument(
        "--guest",
        choices=sorted(WORKLOADS),
        metavar="WORKLOAD",
        help=f"boot the test guest into a workload ({', '.join(sorted(WORKLOADS))}); copies it into the home",
    )
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="workload parameter")
    p.add_argument(
        "--nic", action="append", default=[], metavar="NET", help="a NIC: user (default) or bridge:NAME"
    )
    p.add_argument("--no-nic", action="store_true", help="no network at all")
    p.add_argument("--mac", action="append", default=[], metavar="M", help="MAC of the NICs, in order")
    p.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="[ADDR:]HOST:GUEST[/udp]",
        help="forward a host port to the guest (first NIC, user network; ADDR defaults to 127.0.0.1)",
    )
    p.add_argument(
        "--cpu-model", metavar="MODEL", help="QEMU CPU model (default: host under KVM, qemu64 else)"
    )
    p.add_argument("--machine", default="q35", help="machine type; aliases are pinned to this QEMU's version")
    p.add_argument("--firmware", choices=["bios", "uefi"], default="bios")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")

    p = command("start", start_command, "start the VM (a supervisor process owns it)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="override the spec's accelerator")
    p.add_argument("--qemu", help="QEMU binary")
    p.add_argument("--timeout", type=float, default=control.DEFAULT_START_TIMEOUT, metavar="S")
    p = command("stop", stop_command, "power off: ACPI, then quit, then kill")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="how long the guest may take (ACPI)"
    )
    p.add_argument("--hard", action="store_true", help="skip ACPI: QMP quit at once")
    p.add_argument("--force", action="store_true", help="SIGKILL the supervisor (when it does not answer)")
    command("pause", pause_command, "pause the guest's CPUs").set_defaults(remote=None, via_cluster=None)
    command("resume", resume_command, "resume a paused guest").set_defaults(remote=None, via_cluster=None)
    for name in ("status", "show"):
        p = command(name, status_command, "run state, pids, last exit")
        p.add_argument("--json", action="store_true")
    p = command("console", console_command, "print the serial console log")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the VM stops")
    p.add_argument("--previous", action="store_true", help="the boot before this one")
    p.set_defaults(remote=remote.vm_console)
    for name in ("delete", "destroy"):
        p = command(name, destroy_command, "delete a stopped VM with its disks")
        p.add_argument("--yes", action="store_true", help="yes, delete its disks")
        p.set_defaults(remote=remote.vm_destroy)

    p = group.add_parser("list", help="the VMs of a datastore (with --agent: of the host)")
    p.add_argument("--datastore", type=Path, metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(
        func=list_command, local_requires=("datastore",), remote=remote.vm_list, via_cluster=in_cluster
    )


def in_cluster(args: argparse.Namespace) -> int:
    """A VM command through the cluster (``--etcd``): the etcd client loads only then."""
    from hikkoshi.cli import cluster_vms

    return cluster_vms.dispatch(args)


def _fail(args: argparse.Namespace, exc: BaseException) -> int:
    print(f"hikkoshi vm {args.vm_command}: {exc}", file=sys.stderr)
    return 1


def _lookup(args: argparse.Namespace) -> tuple[VmHome, VmSpec]:
    return Datastore.open(args.datastore).lookup(args.name)


# --- create ---------------------------------------------------------------------------------------------


def _disks(items: list[str]) -> list[dict[str, Any]]:
    disks = []
    for i, item in enumerate(items):
        size, _, provisioning = item.partition(":")
        disks.append({"name": f"disk{i}", "size": size, "provisioning": provisioning or "thin"})
    return disks


def _forward(text: str) -> dict[str, Any]:
    body, _, protocol = text.partition("/")
    parts = body.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--forward {text!r}: expected [ADDR:]HOSTPORT:GUESTPORT[/udp]")
    forward: dict[str, Any] = {"protocol": protocol or "tcp", "host_port": parts[-2], "guest_port": parts[-1]}
    if len(parts) == 3:
        forward["host_address"] = parts[0]
    return forward


def build_spec_data(args: argparse.Namespace) -> dict[str, Any]:
    """The spec (as plain data, validated later) that ``vm create``'s options describe.

    With ``--guest`` there is no ``boot`` yet: :func:`create_guest_vm` adds the guest's.
    """
    networks = [] if args.no_nic else (args.nic or ["user"])
    if args.no_nic and (args.nic or args.mac or args.forward):
        raise ValueError("--no-nic contradicts --nic, --mac and --forward")
    if len(args.mac) > len(networks):
        raise ValueError(f"{len(args.mac)} MACs for {len(networks)} NICs")
    nics: list[dict[str, Any]] = [{"network": net} for net in networks]
    for nic, mac in zip(nics, args.mac, strict=False):
        nic["mac"] = mac
    if args.forward:
        nics[0]["forwards"] = [_forward(f) for f in args.forward]
    disks = _disks(args.disk)
    if args.image is not None and not disks:
        disks = [{"name": "disk0", "size": 512, "provisioning": "thin"}]  # grown to the image
    boot: dict[str, Any] = {}
    if args.guest:
        if args.kernel or args.initrd:
            raise ValueError("--guest boots the test guest's kernel; it cannot go with --kernel or --initrd")
    else:
        if args.param:
            raise ValueError("--param goes with --guest")
        if args.kernel:
            boot["kernel"] = str(args.kernel.expanduser().absolute())
        if args.initrd:
            boot["initrd"] = str(args.initrd.expanduser().absolute())
        if args.append is not None:
            boot["append"] = args.append
    return {
        "name": args.name,
        "memory_mib": args.memory,
        "cpus": args.cpus,
        "machine": resolve_machine(args.machine),
        "firmware": args.firmware,
        "accel": args.accel,
        "disks": disks,
        "nics": nics,
        **({"boot": boot} if boot else {}),
        **({"cpu_model": args.cpu_model} if args.cpu_model else {}),
    }


def create_command(args: argparse.Namespace) -> int:
    if args.host is not None:
        print("hikkoshi vm create: --host needs a cluster (--etcd URL or HIKKOSHI_ETCD)", file=sys.stderr)
        return 2
    try:
        store = Datastore.open(args.datastore)
        data = build_spec_data(args)
        if args.guest:
            if args.image is not None:
                raise ValueError("--guest boots from its kernel; --image makes no sense with it")
            home = create_guest_vm(
                store, build_guest(), data, args.guest, parse_params(args.param), append=args.append or ""
            )
        else:
            home = store.create_vm(
                parse_spec(data), host_facts(), image=args.image, image_format=args.image_format
            )
    except (VmError, ValueError, GuestImageError) as exc:
        return _fail(args, exc)
    spec = home.load_spec()
    print(f"created VM {spec.name!r} (uuid {spec.uuid}) in {home.path}")
    for disk in spec.disks:
        print(f"  disk {disk.name}: {format_size(disk.size)} {disk.provisioning}")
    for i, nic in enumerate(spec.nics):
        print(f"  nic{i}: {nic.mac} on {nic.network}")
    return 0


# --- running --------------------------------------------------------------------------------------------


def start_command(args: argparse.Namespace) -> int:
    try:
        home, _spec = _lookup(args)
        info = control.start_vm(home, accel=args.accel, qemu=args.qemu, timeout=args.timeout)
    except VmError as exc:
        return _fail(args, exc)
    print(
        f"started VM {args.name!r}: supervisor pid {info['supervisor_pid']}, QEMU pid {info['qemu_pid']}, "
        f"accel {info['accel']}; console: {home.console_log}"
    )
    return 0


def stop_command(args: argparse.Namespace) -> int:
    try:
        home, spec = _lookup(args)
        if args.force:
            if not control.kill_vm(home):
                print(f"VM {args.name!r} is not running")
                return 0
            print(f"killed the supervisor of VM {args.name!r} (QEMU and the NBD service went with it)")
            return 0
        state = run(control.stop_vm(home, spec, grace=args.timeout, hard=args.hard))
    except VmError as exc:
        return _fail(args, exc)
    exit_info = state.get("exit") or {}
    how, code = exit_info.get("how", "unknown"), exit_info.get("returncode")
    print(f"stopped VM {args.name!r} ({how}, QEMU status {code})")
    return 0


def _simple(args: argparse.Namespace, command: str) -> int:
    try:
        home, spec = _lookup(args)
        status = run(control.request(home, spec, command))
    except VmError as exc:
        return _fail(args, exc)
    print(f"VM {args.name!r}: {status['state']}")
    return 0


def pause_command(args: argparse.Namespace) -> int:
    return _simple(args, "pause")


def resume_command(args: argparse.Namespace) -> int:
    return _simple(args, "resume")


def status_command(args: argparse.Namespace) -> int:
    try:
        home, spec = _lookup(args)
        status = run(control.vm_status(home, spec))
    except VmError as exc:
        return _fail(args, exc)
    if args.json:
        print(json.dumps(status, indent=2))
    elif status["running"]:
        print(
            f"VM {args.name!r}: {status['state']} (supervisor pid {status['supervisor_pid']}, "
            f"QEMU pid {status['qemu_pid']}, accel {status['accel']})"
        )
        if status.get("error"):
            print(f"  problem: {status['error']}")
    else:
        last = status.get("last_exit") or {}
        extra = f"; last exit: {last.get('how')} (status {last.get('returncode')})" if last else ""
        if status.get("last_error"):
            extra += f"; last error: {status['last_error']}"
        print(f"VM {args.name!r}: stopped{extra}")
    return 0


def console_command(args: argparse.Namespace) -> int:
    try:
        home, _spec = _lookup(args)
    except VmError as exc:
        return _fail(args, exc)
    path = home.path / "console.log.1" if args.previous else home.console_log
    if not path.exists():
        print(f"hikkoshi vm console: {path} does not exist (never started?)", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    with path.open("rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not args.follow or not home.is_running():
                return 0
            time.sleep(0.2)


def destroy_command(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"hikkoshi vm {args.vm_command}: this deletes the VM's disks; add --yes if you mean it",
            file=sys.stderr,
        )
        return 2
    try:
        Datastore.open(args.datastore).destroy_vm(args.name)
    except VmError as exc:
        return _fail(args, exc)
    print(f"{'deleted' if args.vm_command == 'delete' else 'destroyed'} VM {args.name!r}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    try:
        entries = Datastore.open(args.datastore).entries()
    except VmError as exc:
        print(f"hikkoshi vm list: {exc}", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = []
    for e in entries:
        rows.append(
            {
                "name": e.name,
                "running": e.home.is_running(),
                "memory_mib": e.spec.memory_mib if e.spec else None,
                "disks": [d.name for d in e.spec.disks] if e.spec else [],
                "error": e.error,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "running" if row["running"] else "stopped"
        detail = (
            f"{row['memory_mib']} MiB, disks {', '.join(row['disks']) or '-'}"
            if not row["error"]
            else row["error"]
        )
        print(f"{row['name']:24} {state:8} {detail}")
    return 0
