"""Datastores: init/open, VM creation and its prechecks, thin and thick disks, capacity, imports."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.vm.datastore import MARKER, Datastore
from hikkoshi.vm.errors import DatastoreError, PrecheckError, RuntimeStateError
from hikkoshi.vm.spec import VmSpec, parse_spec
from tests.support.facts import facts

MIB = 1 << 20


def spec(name: str = "vm1", **changes: Any) -> VmSpec:
    data: dict[str, Any] = {"name": name, "memory_mib": 256, "disks": [{"name": "disk0", "size": "16M"}]}
    data.update(changes)
    return parse_spec(data)


@pytest.fixture
def store(tmp_path: Path) -> Datastore:
    return Datastore.init(tmp_path / "ds")


# --- opening --------------------------------------------------------------------------------------------


def test_init_and_open(tmp_path: Path) -> None:
    made = Datastore.init(tmp_path / "ds", name="fast")
    opened = Datastore.open(tmp_path / "ds")
    assert (opened.name, opened.uuid, opened.path) == ("fast", made.uuid, tmp_path / "ds")
    with pytest.raises(DatastoreError, match="is a datastore already"):
        Datastore.init(tmp_path / "ds")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DatastoreError, match="not an empty directory"):
        Datastore.init(tmp_path / "full")


def test_unknown_datastore_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(DatastoreError, match=r"unknown datastore .*/nowhere: no such directory"):
        Datastore.open(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(
        DatastoreError, match=rf"unknown datastore .*/plain: it has no {MARKER}.*datastore init"
    ):
        Datastore.open(tmp_path / "plain")
    (tmp_path / "plain" / MARKER).write_text("format = 9\n")
    with pytest.raises(DatastoreError, match="unsupported format 9"):
        Datastore.open(tmp_path / "plain")


# --- creating VMs ---------------------------------------------------------------------------------------


def test_create_lists_and_looks_up(store: Datastore, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    home = store.create_vm(spec("a", boot={"kernel": str(kernel)}), facts())
    store.create_vm(spec("b"), facts())
    assert home.path == store.path / "a"
    assert (home.path.stat().st_mode & 0o777) == 0o700
    assert [e.name for e in store.entries()] == ["a", "b"]
    got_home, got = store.lookup("a")
    assert got_home.path == home.path and got.boot.kernel == kernel
    with pytest.raises(DatastoreError, match=r"no VM named 'c' in datastore .* \(VMs: a, b\)"):
        store.lookup("c")
    with pytest.raises(DatastoreError, match="has a VM named 'a' already"):
        store.create_vm(spec("a"), facts())


def test_duplicate_mac_in_the_datastore_is_refused(store: Datastore) -> None:
    mac = "52:54:00:12:34:56"
    store.create_vm(spec("a", nics=[{"mac": mac}]), facts())
    with pytest.raises(PrecheckError) as err:
        store.create_vm(spec("b", nics=[{}, {"mac": mac.upper()}]), facts())
    assert err.value.problems == [f"nics[1].mac: {mac} is already used by VM 'a' in this datastore"]
    assert str(err.value).startswith("cannot create VM 'b':\n")
    assert not (store.path / "b").exists()


def test_more_memory_than_the_host_has_is_refused(store: Datastore) -> None:
    with pytest.raises(PrecheckError) as err:
        store.create_vm(spec("big", memory_mib=32768), facts(total_mib=16384))
    assert err.value.problems == ["memory_mib: 32768 MiB is more than this host has (16 GiB in all)"]
    assert not (store.path / "big").exists()


def test_missing_kernel_is_refused(store: Datastore, tmp_path: Path) -> None:
    with pytest.raises(PrecheckError) as err:
        store.create_vm(spec("k", boot={"kernel": str(tmp_path / "nope"), "initrd": str(tmp_path)}), facts())
    assert err.value.problems == [
        f"boot.kernel: {tmp_path / 'nope'} does not exist",
        f"boot.initrd: {tmp_path} is not a file",
    ]


def test_every_problem_is_reported_at_once(store: Datastore, tmp_path: Path) -> None:
    store.create_vm(spec("a", nics=[{"mac": "52:54:00:00:00:01"}]), facts())
    bad = spec(
        "b",
        memory_mib=1 << 20,
        nics=[{"mac": "52:54:00:00:00:01"}],
        boot={"kernel": str(tmp_path / "missing")},
    )
    with pytest.raises(PrecheckError) as err:
        store.create_vm(bad, facts())
    assert len(err.value.problems) == 3


def test_thin_and_thick_disks(store: Datastore) -> None:
    home = store.create_vm(
        spec(
            "t",
            disks=[
                {"name": "thin", "size": "32M", "provisioning": "thin"},
                {"name": "thick", "size": "32M", "provisioning": "thick"},
            ],
        ),
        facts(),
    )
    thin, thick = home.path / "thin.raw", home.path / "thick.raw"
    assert thin.stat().st_size == thick.stat().st_size == 32 * MIB
    assert thin.stat().st_blocks * 512 < MIB  # sparse: nothing allocated
    assert thick.stat().st_blocks * 512 >= 32 * MIB  # every block allocated
    assert (thin.stat().st_mode & 0o777) == 0o600


def test_thick_disks_must_fit(store: Datastore) -> None:
    free = shutil.disk_usage(store.path).free
    too_big = (free // MIB + 1024) * MIB
    with pytest.raises(PrecheckError, match="the thick disks need"):
        store.create_vm(
            spec("huge", disks=[{"name": "d", "size": too_big, "provisioning": "thick"}]), facts()
        )
    # Thin disks may promise more than there is.
    home = store.create_vm(spec("thin", disks=[{"name": "d", "size": too_big}]), facts())
    assert (home.path / "d.raw").stat().st_size == too_big


def test_capacity(store: Datastore) -> None:
    empty = store.capacity()
    st = os.statvfs(store.path)
    assert empty.total == st.f_blocks * st.f_frsize
    assert 0 < empty.free <= empty.total
    assert (empty.provisioned, empty.allocated) == (0, 0)
    store.create_vm(spec("a", disks=[{"name": "d", "size": "64M"}]), facts())
    store.create_vm(spec("b", disks=[{"name": "d", "size": "8M", "provisioning": "thick"}]), facts())
    cap = store.capacity()
    assert cap.provisioned == 72 * MIB
    assert 8 * MIB <= cap.allocated < 9 * MIB
    assert cap.total == empty.total


def test_populate_puts_boot_files_into_the_home(store: Datastore, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    base = spec("p", boot={"kernel": str(kernel)})

    def populate(home: Any) -> VmSpec:
        home.add_file(kernel, "vmlinux")
        return base.model_copy(update={"boot": base.boot.model_copy(update={"kernel": Path("vmlinux")})})

    home = store.create_vm(base, facts(), populate=populate)
    assert (home.path / "vmlinux").read_bytes() == b"kernel"
    assert home.load_spec().boot.kernel == Path("vmlinux")
    assert home.boot_path(Path("vmlinux")) == home.path / "vmlinux"


def test_destroy(store: Datastore) -> None:
    home = store.create_vm(spec("gone"), facts())
    with home.locked() as free:  # as a running supervisor would
        assert free
        with pytest.raises(RuntimeStateError, match="is running; stop it first"):
            store.destroy_vm("gone")
    store.destroy_vm("gone")
    assert not home.path.exists()
    assert store.entries() == []


def test_broken_spec_is_listed_with_its_error(store: Datastore) -> None:
    (store.path / "broken").mkdir()
    (store.path / "broken" / "vm.toml").write_text('name = "broken"\nmemory_mib = "lots"\n')
    (entry,) = store.entries()
    assert entry.spec is None and entry.error is not None and "memory_mib" in entry.error


# --- imports --------------------------------------------------------------------------------------------


needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


@needs_qemu_img
def test_import_qcow2_image(store: Datastore, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data = os.urandom(MIB)
    with raw.open("wb") as f:
        f.truncate(24 * MIB)
        f.seek(5 * MIB)
        f.write(data)
    qcow = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)

    home = store.create_vm(spec("imp", disks=[{"name": "root", "size": "8M"}]), facts(), image=qcow)
    disk = home.path / "root.raw"
    assert home.load_spec().disks[0].size == 24 * MIB  # grown to the image
    assert disk.read_bytes() == raw.read_bytes()
    assert disk.stat().st_blocks * 512 < 4 * MIB  # stays thin

    bigger = store.create_vm(spec("imp2", disks=[{"name": "root", "size": "32M"}]), facts(), image=qcow)
    assert (bigger.path / "root.raw").stat().st_size == 32 * MIB


@needs_qemu_img
def test_import_refuses_backing_files_and_garbage(store: Datastore, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MIB))
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)], check=True
    )
    with pytest.raises(DatastoreError, match="flatten it first"):
        store.create_vm(spec("ov"), facts(), image=overlay)
    assert not (store.path / "ov").exists()
    with pytest.raises(DatastoreError, match="cannot read image"):
        store.create_vm(spec("none"), facts(), image=tmp_path / "missing.qcow2")
