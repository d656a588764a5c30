"""The accelerator choice: overrides, the KVM probe (checked under TCG, where it must pass), the memo."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from hikkoshi.vm import accel, kvm_probe
from hikkoshi.vm.accel import choose_accel, detect_accel

need_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


def test_choose_accel_overrides() -> None:
    assert choose_accel("tcg") == "tcg"
    assert choose_accel("kvm") == "kvm"
    assert choose_accel("auto", env={"HIKKOSHI_ACCEL": "tcg"}) == "tcg"
    with pytest.raises(ValueError):
        choose_accel("xen")
    with pytest.raises(ValueError):
        choose_accel("auto", env={"HIKKOSHI_ACCEL": "hvf"})


def test_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIKKOSHI_ACCEL", "tcg")
    assert detect_accel() == "tcg"
    monkeypatch.setenv("HIKKOSHI_ACCEL", "xen")
    with pytest.raises(ValueError):
        detect_accel()


@need_qemu
def test_probe_runs_to_its_end_under_tcg() -> None:
    """The probe itself is right: where the CPU does what it asks (TCG), QEMU ends with the pass code."""
    assert kvm_probe.guest_runs("qemu-system-x86_64", accel="tcg", cpu="qemu64")


@need_qemu
def test_probe_fails_on_a_cpu_without_long_mode() -> None:
    """A CPU that cannot do what the probe asks ends it otherwise (a triple fault: QEMU exits 0)."""
    assert not kvm_probe.guest_runs("qemu-system-x86_64", accel="tcg", cpu="qemu32")


def test_probe_without_qemu_says_no() -> None:
    assert not kvm_probe.guest_runs("/nonexistent/qemu", accel="tcg", cpu="qemu64")


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None, reason="needs binutils")
def test_probe_image_is_its_source_assembled(tmp_path: Path) -> None:
    """The bytes the module boots are what the assembly in its docstring says."""
    doc = kvm_probe.__doc__ or ""
    source = textwrap.dedent(doc.split("::\n", 1)[1])
    (tmp_path / "probe.S").write_text(source)
    subprocess.run(["as", "--64", "-o", "probe.o", "probe.S"], cwd=tmp_path, check=True)
    link = ["ld", "-m", "elf_x86_64", "-Ttext=0x100000", "--oformat=binary", "-o", "probe.bin", "probe.o"]
    subprocess.run(link, cwd=tmp_path, check=True)
    assert (tmp_path / "probe.bin").read_bytes() == kvm_probe.PROBE_IMAGE


def test_answer_is_remembered_per_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One probe per host boot and QEMU binary: later calls and later processes (the file) reuse it."""
    probes: list[str] = []

    def probe(qemu: str) -> bool:
        probes.append(qemu)
        return False

    monkeypatch.delenv("HIKKOSHI_ACCEL", raising=False)
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: True)
    monkeypatch.setattr(kvm_probe, "guest_runs", probe)
    monkeypatch.setattr(accel, "_memo", {})
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert detect_accel(env=env) == "tcg"
    assert detect_accel(env=env) == "tcg"
    assert probes == ["qemu-system-x86_64"]
    memo = accel.memo_path(env)
    assert memo == tmp_path / "hikkoshi" / "accel.json" and memo.is_file()

    monkeypatch.setattr(accel, "_memo", {})  # another process: the file answers
    assert detect_accel(env=env) == "tcg" and len(probes) == 1

    monkeypatch.setattr(accel, "_memo", {})
    monkeypatch.setattr(accel, "boot_id", lambda: "another-boot")  # after a reboot: probed again
    assert detect_accel(env=env) == "tcg" and len(probes) == 2
    assert all(key.startswith("another-boot ") for key in accel._read_memo(memo))  # older boots dropped
