"""The QEMU binary and accelerator a VM runs with (KVM where it really works, else TCG)."""

from __future__ import annotations

from typing import Literal

DEFAULT_QEMU = "qemu-system-x86_64"
Accel = Literal["kvm", "tcg"]


def choose_accel(requested: str = "auto", *, qemu: str = DEFAULT_QEMU) -> Accel:
    """See :func:`hikkoshi.vm.host.choose_accel`."""
    from hikkoshi.vm.host import choose_accel as choose

    return choose(requested, qemu=qemu)
