"""DRS commands refused before any cluster is asked: without --etcd, bad options, --dry-run outside a
cluster; and an etcd that does not answer (exit 3)."""

from __future__ import annotations

import pytest

from tests.support.cluster_cli import in_process

CapSys = pytest.CaptureFixture[str]
NOWHERE = ("--etcd", "http://127.0.0.1:9")  # discard: nothing answers


@pytest.mark.parametrize(
    "args",
    [
        ("drs", "plan"),
        ("drs", "apply"),
        ("drs", "auto", "on"),
        ("rule", "list"),
        ("rule", "add", "r", "--affinity", "a,b"),
        ("schedule", "list"),
        ("schedule", "add", "vm", "--to", "b", "--at", "+5s"),
    ],
)
def test_without_a_cluster(capsys: CapSys, args: tuple[str, ...]) -> None:
    r = in_process(capsys, *args)
    assert r.code == 2 and "needs a cluster" in r.err and r.err.startswith(f"hikkoshi {args[0]} {args[1]}")


def test_bad_options_are_refused_before_etcd(capsys: CapSys) -> None:
    r = in_process(capsys, *NOWHERE, "rule", "add", "r", "--anti-affinity", "only-one")
    assert r.code == 2 and "at least two VMs" in r.err
    r = in_process(capsys, *NOWHERE, "rule", "add", "r", "--vm-host", "a")
    assert r.code == 2 and "needs --hosts" in r.err
    r = in_process(capsys, *NOWHERE, "schedule", "add", "vm", "--to", "b", "--at", "soon")
    assert r.code == 2 and "--at 'soon'" in r.err
    r = in_process(capsys, *NOWHERE, "schedule", "add", "vm", "--to", "b", "--window", "2-")
    assert r.code == 2 and "--window" in r.err
    r = in_process(capsys, *NOWHERE, "drs", "auto", "--interval", "0")
    assert r.code == 2 and "positive" in r.err
    r = in_process(capsys, *NOWHERE, "drs", "plan", "--level", "9")
    assert r.code == 2


def test_dry_run_needs_the_cluster(capsys: CapSys) -> None:
    r = in_process(
        capsys, "--agent", "http://127.0.0.1:9", "migrate", "vm", "--to", "http://x:1", "--dry-run"
    )
    assert r.code == 2 and "--dry-run" in r.err and "--etcd" in r.err


def test_etcd_unreachable(capsys: CapSys) -> None:
    r = in_process(capsys, *NOWHERE, "drs", "plan")
    assert r.code == 3 and "etcd does not answer" in r.err
