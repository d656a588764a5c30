"""Does KVM really run guests here? A guest of 222 bytes that must reach long mode to say yes.

An openable ``/dev/kvm`` is not enough: some hosts (nested, e.g. under a PVM hypervisor) create VMs
and even run real-mode firmware, then abort on an MSR write with ``-cpu host`` or hang once the guest
leaves real mode. So :func:`guest_runs` boots :data:`PROBE_IMAGE` the way a VM would run (``-cpu
host`` under KVM): QEMU's multiboot loader (``-kernel``) starts it in 32-bit protected mode; it turns
on PAE paging and ``EFER.LME`` (``wrmsr``), jumps into 64-bit code, writes ``IA32_KERNEL_GS_BASE``,
reads it back, and ends QEMU through ``isa-debug-exit`` with a known status. Anything else (QEMU
aborting, a triple fault ending it with 0, a hang until the timeout) means no.

The image is the source below, assembled once with binutils and kept as bytes (the test suite checks
that they still match)::

    # as --64 -o probe.o probe.S && ld -m elf_x86_64 -Ttext=0x100000 --oformat=binary -o probe.bin probe.o
            .set LOAD, 0x100000
            .set PML4, 0x101000          # page tables in the zeroed area after the image (bss)
            .set PDPT, 0x102000
            .set PD, 0x103000
            .set BSS_END, 0x104000
            .set EXIT_PORT, 0xf4         # -device isa-debug-exit,iobase=0xf4
            .set PASS, 0x2a              # QEMU exits with (0x2a << 1) | 1 = 85
            .set FAIL, 0x15              # 43

            .code32
            .globl _start
    header:
            .long 0x1badb002             # multiboot magic
            .long 0x00010000             # flags: load at the addresses below
            .long -(0x1badb002 + 0x00010000)
            .long header                 # header_addr
            .long header                 # load_addr
            .long load_end               # load_end_addr
            .long BSS_END                # bss_end_addr
            .long _start                 # entry_addr
    _start:
            cli
            lgdt gdt_ptr
            mov $PML4, %edi              # zero the three tables
            xor %eax, %eax
            mov $(3 * 4096 / 4), %ecx
            rep stosl
            movl $(PDPT + 3), PML4       # present | writable
            movl $(PD + 3), PDPT
            movl $0x83, PD               # 2 MiB page at 0: present | writable | large
            mov %cr4, %eax
            or $0x20, %eax               # CR4.PAE
            mov %eax, %cr4
            mov $PML4, %eax
            mov %eax, %cr3
            mov $0xc0000080, %ecx        # EFER
            rdmsr
            or $0x100, %eax              # EFER.LME
            wrmsr
            mov %cr0, %eax
            or $0x80000001, %eax         # CR0.PG | CR0.PE: long mode is active
            mov %eax, %cr0
            ljmp $0x08, $long_mode

            .code64
    long_mode:
            mov $0x10, %ax
            mov %ax, %ds
            mov %ax, %es
            mov %ax, %ss
            mov $0xc0000102, %ecx        # IA32_KERNEL_GS_BASE: write it, read it back
            mov $0x6873696b, %eax
            mov $0x6f6b6b69, %edx
            wrmsr
            xor %eax, %eax
            xor %edx, %edx
            rdmsr
            cmp $0x6873696b, %eax
            jne fail
            cmp $0x6f6b6b69, %edx
            jne fail
            mov $PASS, %al
            out %al, $EXIT_PORT
    fail:
            mov $FAIL, %al
            out %al, $EXIT_PORT
            hlt
            jmp fail

            .p2align 3
    gdt:
            .quad 0
            .quad 0x00209a0000000000     # 0x08: 64-bit code
            .quad 0x0000920000000000     # 0x10: data
    gdt_ptr:
            .word gdt_ptr - gdt - 1
            .long gdt
    load_end:
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

PROBE_IMAGE = bytes.fromhex(
    "02b0ad1b00000100fe4f51e40000100000001000de0010000040100020001000fa0f0115d8001000bf0010100031c0b9"
    "000c0000f3abc7050010100003201000c7050020100003301000c70500301000830000000f20e083c8200f22e0b80010"
    "10000f22d8b9800000c00f320d000100000f300f20c00d010000800f22c0ea85001000080066b810008ed88ec08ed0b9"
    "020100c0b86b697368ba696b6b6f0f3031c031d20f323d6b697368750c81fa696b6b6f7504b02ae6f4b015e6f4f4ebf9"
    "000000000000000000000000009a200000000000009200001700c0001000"
)
"""The assembled probe: a multiboot image loaded at 1 MiB (see the module's docstring)."""

PASS_STATUS = (0x2A << 1) | 1
"""QEMU's exit status when the probe got through: isa-debug-exit exits with (byte << 1) | 1."""

PROBE_TIMEOUT = 10.0
"""KVM that cannot run 222 bytes in 10 s is no better than TCG (the probe takes ~0.2 s there)."""


def probe_command(image: Path, *, qemu: str, accel: str, cpu: str) -> list[str]:
    """The QEMU command line booting the probe ``image``."""
    return [
        qemu,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        "16",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",  # a triple fault ends QEMU (status 0) instead of looping through resets
        "-kernel",
        str(image),
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]


def guest_runs(qemu: str, *, accel: str = "kvm", cpu: str = "host", timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether ``qemu`` runs the probe to its end under ``accel`` with ``cpu``, within ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="hikkoshi-kvm-probe-") as tmp:
        image = Path(tmp) / "probe.bin"
        image.write_bytes(PROBE_IMAGE)
        try:
            proc = subprocess.Popen(
                probe_command(image, qemu=qemu, accel=accel, cpu=cpu),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            return False  # no QEMU: nothing runs guests
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code == PASS_STATUS
