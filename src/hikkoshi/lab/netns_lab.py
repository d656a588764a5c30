"""A multi-host lab on one machine: each host is a network namespace with its own address, joined to the
others by a bridge in the root namespace (which gets an address too, so the command line reaches every
agent). Hosts are in sites; migrations between sites cross the WAN emulator (the agents' ``--wan-link``).

The plan is pure (names, addresses, the ``ip`` commands that make and unmake it);
:func:`hikkoshi.lab.netns_run.run_ip` carries commands out. Names are short (interface names have at
most 15 characters) and carry the lab's number, so several labs can exist side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Addresses are 10.203.LAB.HOST/24; the bridge is .254.
SUBNET = "10.203"
MAX_HOSTS = 200


@dataclass(frozen=True)
class LabHost:
    """One host of the lab."""

    name: str
    site: str
    netns: str
    address: str
    veth_root: str
    """Its end of the cable in the root namespace (on the bridge)."""
    veth_ns: str
    """Its end inside the namespace."""


@dataclass(frozen=True)
class LabPlan:
    """A whole lab."""

    lab: int
    bridge: str
    gateway: str
    hosts: tuple[LabHost, ...]


def plan_lab(names: list[str], sites: list[str], lab: int) -> LabPlan:
    """The lab of hosts ``names``, host ``i`` in ``sites[i]``; ``lab`` (0-255) numbers it."""
    if not 0 <= lab <= 255:
        raise ValueError(f"lab number {lab} is not 0-255")
    if not names or len(names) > MAX_HOSTS:
        raise ValueError(f"a lab has 1 to {MAX_HOSTS} hosts")
    if len(set(names)) != len(names):
        raise ValueError("host names must differ")
    if len(sites) != len(names):
        raise ValueError("one site per host")
    for name in names:
        if not name.replace("-", "").isalnum() or len(name) > 32:
            raise ValueError(f"host name {name!r}: letters, digits and '-', at most 32")
    hosts = tuple(
        LabHost(
            name=name,
            site=site,
            netns=f"hkl{lab}-{name}",
            address=f"{SUBNET}.{lab}.{i + 1}",
            veth_root=f"hkl{lab}r{i}",
            veth_ns=f"hkl{lab}n{i}",
        )
        for i, (name, site) in enumerate(zip(names, sites, strict=True))
    )
    return LabPlan(lab=lab, bridge=f"hkl{lab}br", gateway=f"{SUBNET}.{lab}.254", hosts=hosts)


def setup_commands(plan: LabPlan) -> list[list[str]]:
    """The ``ip`` commands that make the lab."""
    cmds = [
        ["ip", "link", "add", plan.bridge, "type", "bridge"],
        ["ip", "addr", "add", f"{plan.gateway}/24", "dev", plan.bridge],
        ["ip", "link", "set", plan.bridge, "up"],
    ]
    for h in plan.hosts:
        cmds += [
            ["ip", "netns", "add", h.netns],
            ["ip", "-n", h.netns, "link", "set", "lo", "up"],
            ["ip", "link", "add", h.veth_root, "type", "veth", "peer", "name", h.veth_ns, "netns", h.netns],
            ["ip", "link", "set", h.veth_root, "master", plan.bridge, "up"],
            ["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.veth_ns],
            ["ip", "-n", h.netns, "link", "set", h.veth_ns, "up"],
        ]
    return cmds


def teardown_commands(plan: LabPlan) -> list[list[str]]:
    """The ``ip`` commands that unmake it (each may fail harmlessly if that part is gone)."""
    cmds = [["ip", "netns", "del", h.netns] for h in plan.hosts]  # takes the veth pairs with it
    cmds += [["ip", "link", "del", h.veth_root] for h in plan.hosts]
    cmds.append(["ip", "link", "del", plan.bridge])
    return cmds


class LabError(RuntimeError):
    """The lab cannot be made (not root, no ``ip``, names in use)."""
