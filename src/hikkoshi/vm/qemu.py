"""QEMU and NBD service command lines for a VM spec. Pure: no processes are started here.

Every disk is an export of the VM's NBD service (``hikkoshi nbd serve`` on a Unix socket, export
name = disk name); QEMU opens it as a ``nbd`` protocol node under a ``raw`` format node, and a
virtio-blk device with ``werror=stop,rerror=stop``: if the NBD service fails, the guest is paused
rather than shown I/O errors, so the service can come back (or the disk move elsewhere) and the
guest resume without having noticed. QEMU starts paused (``-S``) and connects to the supervisor's
QMP socket; the supervisor lets the guest run once it holds the QMP session. The command is a
function of the spec alone (plus the host's paths), so the same spec gives the same virtual
hardware, in the same order, on any host: what a migration needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hikkoshi.nbd.uri import NbdUri
from hikkoshi.vm.accel import DEFAULT_QEMU, Accel
from hikkoshi.vm.disk_serving import DiskPlan
from hikkoshi.vm.precheck import OVMF_CODE
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import DiskSpec, NicSpec, VmSpec

if TYPE_CHECKING:  # only its paths are asked for: the home's locks and files stay out of here
    from hikkoshi.vm.home import VmHome

UEFI_VARS_FILE = "uefi-vars.fd"
#: Seconds QEMU's disk requests wait for a restarting disk service before they fail.
RECONNECT_DELAY = 15
"""The VM's own copy of the UEFI variable store, in its home."""


def _opt(value: str) -> str:
    """A QEMU option value: commas are doubled."""
    return value.replace(",", ",,")


def cpu_model(spec: VmSpec, accel: Accel) -> str:
    """The spec's CPU model, or ``host`` under KVM and ``qemu64`` under TCG."""
    return spec.cpu_model or ("host" if accel == "kvm" else "qemu64")


def nbd_server(uri: NbdUri) -> dict[str, str]:
    """QEMU's ``SocketAddress`` of an NBD URI."""
    if uri.socket is not None:
        return {"type": "unix", "path": str(uri.socket)}
    return {"type": "inet", "host": uri.host, "port": str(uri.port)}


def disk_uri(disk: DiskSpec, rundir: RunDir) -> NbdUri:
    """Where QEMU finds ``disk``: always the VM's own disk service, whatever serves the bytes (a file, a
    relocation, the holder of a shared disk); see :mod:`hikkoshi.vm.disk_serving`."""
    return NbdUri(export=disk.name, socket=rundir.nbd_socket)


def disk_node(disk_name: str) -> str:
    """The QEMU block node the guest's device of a disk reads and writes (a mirror's source)."""
    return f"disk-{disk_name}"


def disk_device_id(disk_name: str) -> str:
    """The QEMU device id of a disk (its virtio-blk device)."""
    return f"vd-{disk_name}"


def nbd_disk_args(
    disk: DiskSpec,
    where: Path | NbdUri,
    boot: bool = False,
    geometry: tuple[int, int, int] | None = None,
) -> list[str]:
    """QEMU arguments for one disk: an export on the NBD socket ``where``, or at the URI ``where``;
    ``geometry`` (cylinders, heads, sectors) instead of QEMU's guess from the first sector."""
    uri = NbdUri(export=disk.name, socket=where) if isinstance(where, Path) else where
    protocol = {
        "driver": "nbd",
        "node-name": f"nbd-{disk.name}",
        "server": nbd_server(uri),
        "export": uri.export,
        "discard": "unmap",
        # A disk service that restarts (it keeps its state on disk) is reconnected to; requests wait
        # this long for it before they fail (and pause the guest: werror/rerror=stop).
        "reconnect-delay": RECONNECT_DELAY,
    }
    fmt = {"driver": "raw", "node-name": disk_node(disk.name), "file": f"nbd-{disk.name}", "discard": "unmap"}
    device = (
        f"virtio-blk-pci,id={disk_device_id(disk.name)},drive={disk_node(disk.name)},serial={disk.name},"
        "werror=stop,rerror=stop"
    )
    if geometry is not None:
        device += ",cyls={},heads={},secs={}".format(*geometry)
    if boot:
        device += ",bootindex=1"
    return ["-blockdev", json.dumps(protocol), "-blockdev", json.dumps(fmt), "-device", device]


def _nic_args(index: int, nic: NicSpec, tap: str | None) -> list[str]:
    if nic.bridge is not None:
        if tap is None:
            raise ValueError(f"NIC {index} is on bridge {nic.bridge} but has no tap device")
        netdev = f"tap,id=net{index},ifname={tap},script=no,downscript=no"
    else:
        netdev = f"user,id=net{index}"
        for fwd in nic.forwards:
            netdev += f",hostfwd={fwd.protocol}:{fwd.host_address}:{fwd.host_port}-:{fwd.guest_port}"
    return ["-netdev", netdev, "-device", f"virtio-net-pci,id=nic{index},netdev=net{index},mac={nic.mac}"]


def qemu_command(
    spec: VmSpec,
    home: VmHome,
    rundir: RunDir,
    *,
    accel: Accel,
    taps: Mapping[int, str] | None = None,
    qemu: str = DEFAULT_QEMU,
    ovmf_code: Path = OVMF_CODE,
    plan: DiskPlan | None = None,
    incoming: bool = False,
) -> list[str]:
    """The QEMU command line running ``spec``; ``taps`` maps bridged NICs' indexes to tap names.

    Every disk is opened at the VM's disk service; ``plan`` gives the disks' geometry of an incoming VM.
    With ``incoming``, QEMU waits for a migration stream (``migrate-incoming`` over QMP)."""
    taps = taps or {}
    cmd = [
        qemu,
        "-name",
        f"guest={spec.name},process=hk-{spec.name},debug-threads=on",
        "-uuid",
        str(spec.uuid),
        "-machine",
        spec.machine,
        "-accel",
        accel,
        "-cpu",
        cpu_model(spec, accel),
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        *(["-no-reboot"] if spec.on_reboot == "poweroff" else []),
        "-msg",
        "timestamp=on",
        "-chardev",
        f"socket,id=qmp,path={_opt(str(rundir.qmp_socket))}",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={_opt(str(home.console_log))}",
        "-serial",
        "chardev:console",
    ]
    if spec.firmware == "uefi":
        cmd += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(str(ovmf_code))}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={_opt(str(home.path / UEFI_VARS_FILE))}",
        ]
    if spec.boot.kernel is not None:
        cmd += ["-kernel", str(home.boot_path(spec.boot.kernel))]
        if spec.boot.initrd is not None:
            cmd += ["-initrd", str(home.boot_path(spec.boot.initrd))]
        if spec.boot.append:
            cmd += ["-append", spec.boot.append]
    boot_disk = spec.boot_disk
    for disk in spec.disks:
        geometry = plan.geometry.get(disk.name) if plan is not None else None
        cmd += nbd_disk_args(disk, disk_uri(disk, rundir), disk.name == boot_disk, geometry)
    for index, nic in enumerate(spec.nics):
        cmd += _nic_args(index, nic, taps.get(index))
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd
