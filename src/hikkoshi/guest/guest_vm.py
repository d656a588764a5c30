"""VMs that boot the test guest (:mod:`hikkoshi.guest.guest_image`) into one of its workloads.

The guest's kernel and initramfs are linked into the VM's home (``vmlinux``, ``initrd.img``), so
the VM keeps booting the same guest when the cache moves on, and the files travel with the VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hikkoshi.guest.guest_image import GuestImage, kernel_cmdline
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.facts import HostFacts
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts
from hikkoshi.vm.spec import VmSpec, parse_spec


def create_guest_vm(
    store: Datastore,
    guest: GuestImage,
    data: Mapping[str, Any],
    workload: str,
    params: Mapping[str, str | int] | None = None,
    *,
    append: str = "",
    facts: HostFacts | None = None,
) -> VmHome:
    """Create a VM from spec ``data`` (without ``boot``) booting ``guest`` into ``workload``."""
    if data.get("boot"):
        raise ValueError("a test-guest VM boots the guest's kernel; leave boot out")
    cmdline = kernel_cmdline(workload, params)
    if append:
        cmdline += " " + append
    # Validated with the cache's files first; the home then gets its own links to them.
    boot = {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "append": cmdline}
    # The guest reboots only when its kernel panics (panic=-1): end the VM rather than loop.
    spec = parse_spec({"on_reboot": "poweroff", **data, "boot": boot})

    def populate(home: VmHome) -> VmSpec:
        home.add_file(guest.kernel, guest.kernel.name)
        home.add_file(guest.initrd, guest.initrd.name)
        boot = spec.boot.model_copy(
            update={"kernel": Path(guest.kernel.name), "initrd": Path(guest.initrd.name)}
        )
        return spec.model_copy(update={"boot": boot})

    return store.create_vm(spec, facts or host_facts(), populate=populate)
