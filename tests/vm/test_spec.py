"""The VM spec: validation, readable errors, TOML round trips. Pure; no QEMU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.vm.errors import SpecError
from hikkoshi.vm.spec import (
    VmSpec,
    format_size,
    generate_mac,
    normalize_mac,
    parse_size,
    parse_spec,
    spec_from_toml,
    spec_to_toml,
)


def minimal(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "vm1", "memory_mib": 256, "disks": [{"name": "disk0", "size": "64M"}]}
    data.update(changes)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    return err.value.problems


# --- sizes and MACs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64M", 64 << 20), ("64MiB", 64 << 20), ("1g", 1 << 30), ("2 GB", 2 << 30), (512, 512)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "64X", "M", True, 1.0])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 45))
def test_format_size_is_readable(size: int) -> None:
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)", format_size(size))


def test_normalize_mac() -> None:
    assert normalize_mac("52-54-00-AB-cd-EF") == "52:54:00:ab:cd:ef"
    for bad in ["52:54:00:ab:cd", "01:00:5e:00:00:01", "00:00:00:00:00:00", "zz:54:00:ab:cd:ef", 5]:
        with pytest.raises(ValueError):
            normalize_mac(bad)


@given(st.integers(0, 2**32))
@settings(max_examples=50)
def test_generated_macs_are_unicast_in_qemus_range(_: int) -> None:
    mac = generate_mac()
    assert mac.startswith("52:54:00:")
    assert normalize_mac(mac) == mac
    assert int(mac[:2], 16) & 0b10  # locally administered


# --- whole specs ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    spec = parse_spec(minimal(nics=[{}]))
    assert spec.cpus == 1 and spec.machine == "q35" and spec.firmware == "bios" and spec.accel == "auto"
    assert spec.disks[0].size == 64 << 20 and spec.disks[0].provisioning == "thin"
    assert spec.disks[0].file_name == "disk0.raw"
    assert spec.nics[0].network == "user" and spec.nics[0].mac.startswith("52:54:00:")
    assert spec.boot_disk == "disk0"
    assert parse_spec(minimal()).uuid != parse_spec(minimal()).uuid


def test_one_line_per_problem_with_its_place() -> None:
    got = problems(
        {
            "name": "a/b",
            "memroy": 1,
            "memory_mib": 8,
            "disks": [{"name": "Disk", "size": "-1"}, {"name": "d", "size": 1000, "provisioning": "fat"}],
            "nics": [{"mac": "01:00:00:00:00:00"}, {"network": "wifi"}],
        }
    )
    assert len(got) == 9, got
    assert got[0].startswith("name: 'a/b' is not allowed")
    joined = "\n".join(got)
    for expected in [
        "memory_mib: input should be greater than or equal to 16 (got 8)",
        "disks[0].name: 'Disk' is not allowed",
        "disks[0].size: '-1' is not a size",
        "disks[1].size: must be a multiple of 512 bytes, got 1000",
        "disks[1].provisioning: input should be 'thin' or 'thick' (got 'fat')",
        "nics[0].mac: 01:00:00:00:00:00 is a multicast address",
        "nics[1].network: 'wifi' is not a network",
        "memroy: is not a setting of a VM spec (misspelt?)",
    ]:
        assert expected in joined
    assert "pydantic" not in joined and "http" not in joined  # no library boilerplate


def test_whole_spec_problems_are_separate_lines() -> None:
    got = problems(
        minimal(disks=[{"name": "d", "size": 512}, {"name": "d", "size": 512}], boot={"disk": "q"})
    )
    assert got == ["disk name 'd' is used twice", "boot disk 'q' is not one of the disks (d, d)"]
    assert problems(minimal(disks=[])) == ["nothing to boot: give a kernel or a disk"]
    mac = "52:54:00:00:00:01"
    assert problems(minimal(nics=[{"mac": mac}, {"mac": mac.upper()}])) == [f"MAC {mac} is used by two NICs"]


def test_missing_fields() -> None:
    assert problems({"disks": []}) == ["name: is required", "memory_mib: is required"]


def test_boot_rules() -> None:
    spec = parse_spec(
        minimal(boot={"kernel": "/boot/vmlinux", "initrd": "initrd.img", "append": "console=ttyS0"})
    )
    assert spec.boot_disk is None
    assert spec.boot.initrd == Path("initrd.img")
    assert problems(minimal(boot={"kernel": "/k", "disk": "disk0"})) == [
        "boot: boot from a disk or from a kernel, not both"
    ]
    assert problems(minimal(boot={"initrd": "/i"})) == ["boot: initrd and append need a kernel"]
    assert "may not contain '..'" in problems(minimal(boot={"kernel": "../../etc/k"}))[0]
    assert "one line" in problems(minimal(boot={"kernel": "/k", "append": "a\nb"}))[0]


def test_networks_and_forwards() -> None:
    spec = parse_spec(
        minimal(
            nics=[
                {"network": "bridge:br0"},
                {
                    "forwards": [
                        {"host_port": 8080, "guest_port": 80},
                        {"protocol": "udp", "host_port": 53, "guest_port": 53},
                    ]
                },
            ]
        )
    )
    assert spec.nics[0].bridge == "br0" and spec.nics[1].bridge is None
    assert str(spec.nics[1].forwards[0].host_address) == "127.0.0.1"  # loopback unless asked
    assert problems(
        minimal(nics=[{"network": "bridge:br0", "forwards": [{"host_port": 1, "guest_port": 1}]}])
    ) == ["nics[0]: port forwards work with the user network only; a bridged guest is reachable"]
    for bad in ["bridge:", "bridge:waytoolongbridgename", "bridge:a,b", "bridge:..", "tap0"]:
        assert problems(minimal(nics=[{"network": bad}]))[0].startswith("nics[0].network:")


@pytest.mark.parametrize(
    ("field", "value"),
    [("machine", "q35,accel=kvm"), ("machine", ""), ("cpu_model", "qemu64 -device x"), ("name", "..")],
)
def test_no_option_injection(field: str, value: str) -> None:
    assert problems(minimal(**{field: value}))[0].startswith(f"{field}:")


def test_cpu_model_with_features_is_allowed() -> None:
    assert parse_spec(minimal(cpu_model="qemu64,+ssse3,-x2apic")).cpu_model == "qemu64,+ssse3,-x2apic"


# --- TOML -----------------------------------------------------------------------------------------------


def test_toml_round_trip_is_exact() -> None:
    spec = parse_spec(
        minimal(
            cpus=2,
            cpu_model="qemu64",
            firmware="uefi",
            disks=[{"name": "disk0", "size": "1G", "provisioning": "thick"}, {"name": "data", "size": 512}],
            nics=[{"network": "bridge:br0"}, {"forwards": [{"host_port": 2222, "guest_port": 22}]}],
            boot={"disk": "data"},
        )
    )
    text = spec_to_toml(spec)
    assert text.startswith("# hikkoshi VM spec")
    assert spec_from_toml(text) == spec


def test_toml_errors_name_the_file() -> None:
    with pytest.raises(SpecError, match=r"in /x/vm.toml:\n  not valid TOML"):
        spec_from_toml("name = ", "/x/vm.toml")
    with pytest.raises(SpecError, match=r"in /x/vm.toml:\n  memory_mib: is required"):
        spec_from_toml('name = "a"\n[[disks]]\nname = "d"\nsize = 512\n', "/x/vm.toml")


_names = st.from_regex(r"[a-z][a-z0-9_-]{0,19}", fullmatch=True)
_disks: st.SearchStrategy[list[dict[str, Any]]] = st.lists(
    st.fixed_dictionaries(
        {
            "name": _names,
            "size": st.integers(1, 1 << 30).map(lambda n: n * 512),
            "provisioning": st.sampled_from(["thin", "thick"]),
        }
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda d: str(d["name"]),
)
_nics: st.SearchStrategy[list[dict[str, Any]]] = st.lists(
    st.fixed_dictionaries(
        {
            "network": st.sampled_from(["user", "bridge:br0", "bridge:virbr-1"]),
            "mac": st.binary(min_size=5, max_size=5).map(lambda b: "52:" + ":".join(f"{x:02x}" for x in b)),
        }
    ),
    max_size=4,
    unique_by=lambda n: str(n["mac"]),
)


@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True),
    memory=st.integers(16, 1 << 20),
    cpus=st.integers(1, 255),
    disks=_disks,
    nics=_nics,
    append=st.text(st.characters(blacklist_characters="\n\0", blacklist_categories=["Cs"]), max_size=80),
)
@settings(max_examples=60, deadline=None)
def test_any_valid_spec_survives_toml(
    name: str, memory: int, cpus: int, disks: list[dict[str, Any]], nics: list[dict[str, Any]], append: str
) -> None:
    spec = parse_spec(
        {
            "name": name,
            "memory_mib": memory,
            "cpus": cpus,
            "disks": disks,
            "nics": nics,
            "boot": {"kernel": "/boot/k", "append": append},
        }
    )
    again = spec_from_toml(spec_to_toml(spec))
    assert again == spec
    assert isinstance(again, VmSpec)
