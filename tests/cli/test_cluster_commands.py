"""The cluster's commands against a real etcd without agents: limits, listings, refusals and exit codes.

Most run the command's ``main`` in this process (quick); one runs the command itself, to show what a
script sees when etcd does not answer."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.cluster.etcd_process import EtcdMember, free_ports
from tests.support.cluster_cli import Result, clean_env, hikkoshi_cmd, in_process
from tests.support.etcd import member_running

CapSys = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    with member_running(tmp_path_factory.mktemp("etcd")) as member:
        yield member


@pytest.fixture
def url(etcd: EtcdMember) -> str:
    return f"http://{etcd.spec.endpoint}"


def hk(capsys: CapSys, *args: str) -> Result:
    return in_process(capsys, *args)


def ok(capsys: CapSys, url: str, *args: str) -> str:
    r = hk(capsys, "--etcd", url, *args)
    assert r.code == 0, r
    return r.out


def as_json(capsys: CapSys, url: str, *args: str) -> Any:
    return json.loads(ok(capsys, url, *args, "--json"))


def test_limits_set_and_show_round_trip(capsys: CapSys, url: str) -> None:
    shown = as_json(capsys, url, "limits", "show")
    assert shown["limits"] == {"host-out": 2, "host-in": 2, "datastore": 4, "link": 1, "cluster": 8}
    assert shown["overrides"] == {} and shown["queue"] == [] and shown["resources"] == []
    out = ok(capsys, url, "limits", "set", "host-out=1", "host-in=3", "datastore=5", "link=2", "cluster=9")
    assert "host-out 1, host-in 3, datastore 5, link 2, cluster 9" in out
    ok(capsys, url, "limits", "set", "host-out:alpha=4", "link:west~east=3")
    shown = as_json(capsys, url, "limits", "show")
    assert shown["limits"] == {"host-out": 1, "host-in": 3, "datastore": 5, "link": 2, "cluster": 9}
    assert shown["overrides"] == {"host-out:alpha": 4, "link:east~west": 3}
    assert [r["resource"] for r in shown["resources"]] == ["host-out:alpha", "link:east~west"]
    text = ok(capsys, url, "limits", "show")
    assert "overrides  host-out:alpha 4, link:east~west 3" in text and "queue      empty" in text
    # A subset changes only what it names; 'default' takes a setting back.
    ok(capsys, url, "limits", "set", "cluster=default", "host-out:alpha=default")
    shown = as_json(capsys, url, "limits", "show")
    assert shown["limits"]["cluster"] == 8 and shown["limits"]["host-out"] == 1
    assert shown["overrides"] == {"link:east~west": 3}


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("hosts-out=1", "unknown limit 'hosts-out'; valid keys: host-out, host-in, datastore, link, cluster"),
        ("host-out=0", "host-out=0: the limit is a whole number of at least 1"),
        ("host-out", "expected KEY=N, KEY one of host-out, host-in"),
    ],
)
def test_bad_limits_are_refused_with_the_valid_keys(
    capsys: CapSys, url: str, setting: str, says: str
) -> None:
    r = hk(capsys, "--etcd", url, "limits", "set", setting)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith("hikkoshi limits set: ") and says in r.err and r.err.count("\n") == 1


def test_unknown_vm_and_host(capsys: CapSys, url: str) -> None:
    for args in (
        ("vm", "start", "ghost"),
        ("vm", "delete", "ghost", "--yes"),
        ("migrate", "ghost", "--to", "a"),
    ):
        r = hk(capsys, "--etcd", url, *args)
        assert r.code == 2, r
        assert "no VM named 'ghost' in the cluster" in r.err and r.err.count("\n") == 1
    r = hk(capsys, "--etcd", url, "vm", "create", "new", "--host", "nowhere", "--memory", "64")
    assert r.code == 2 and "no host named 'nowhere' in the cluster" in r.err
    # Without --host, DRS places it: in a cluster with no host up, nowhere (said, nothing made).
    r = hk(capsys, "--etcd", url, "vm", "create", "new", "--memory", "64")
    assert r.code == 2 and "no host can take VM 'new'" in r.err, r
    r = hk(capsys, "--etcd", url, "host", "show", "nowhere")
    assert r.code == 2 and "no host named 'nowhere'" in r.err
    r = hk(capsys, "--etcd", url, "migrations", "show", "abc123")
    assert r.code == 2 and "no migration 'abc123'" in r.err


def test_empty_cluster_listings_and_status(capsys: CapSys, url: str) -> None:
    assert as_json(capsys, url, "host", "list") == []
    assert as_json(capsys, url, "vm", "list") == []
    assert as_json(capsys, url, "migrations") == {"migrations": [], "queue": []}
    assert ok(capsys, url, "migrations") == "no migrations recorded\n"
    status = as_json(capsys, url, "cluster", "status")
    assert status["healthy"] and status["leader"] == "solo" and len(status["members"]) == 1
    assert status["keys"] == {"hosts": 0, "hosts-up": 0, "vms": 0, "migrations": 0, "queued": 0}
    assert status["members"][0]["db_size"] > 0 and status["members"][0]["leader"]
    assert "cluster    healthy, leader solo" in ok(capsys, url, "cluster", "status")


def test_etcd_unreachable_is_one_line_and_exit_3(capsys: CapSys) -> None:
    (port,) = free_ports(1)
    for args in (("host", "list"), ("vm", "start", "x")):
        r = hk(capsys, "--etcd", f"127.0.0.1:{port}", *args)
        assert r.code == 3, r
        assert r.err.count("\n") == 1 and f"etcd does not answer at 127.0.0.1:{port}" in r.err
    # The command as a script runs it, with $HIKKOSHI_ETCD: one line, no traceback.
    done = subprocess.run(
        hikkoshi_cmd("migrations"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(HIKKOSHI_ETCD=f"http://127.0.0.1:{port}"),
    )
    assert done.returncode == 3 and done.stdout == ""
    assert (
        done.stderr.startswith("hikkoshi migrations: etcd does not answer") and done.stderr.count("\n") == 1
    )


def test_which_way_a_command_goes(
    capsys: CapSys, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cluster-only command without a cluster; --host without a cluster; --agent with --etcd.
    r = hk(capsys, "host", "list")
    assert r.code == 2 and "needs a cluster: give --etcd URL or set HIKKOSHI_ETCD" in r.err
    r = hk(capsys, "vm", "create", "x", "--host", "a", "--memory", "64", "--datastore", str(tmp_path))
    assert r.code == 2 and "--host needs a cluster" in r.err
    r = hk(capsys, "--etcd", url, "--agent", "http://127.0.0.1:1", "vm", "list")
    assert r.code == 2 and "--agent and --etcd: give one" in r.err
    r = hk(capsys, "--etcd", "https://127.0.0.1:1", "vm", "list")
    assert r.code == 2 and "needs --etcd-ca" in r.err
    # $HIKKOSHI_ETCD works like --etcd; an explicit --agent wins over it (here: no token, so exit 3).
    monkeypatch.setenv("HIKKOSHI_ETCD", url)
    r = hk(capsys, "vm", "list", "--json")
    assert r.code == 0 and json.loads(r.out) == []
    r = hk(capsys, "--agent", "http://127.0.0.1:1", "--token-file", str(tmp_path / "t"), "vm", "list")
    assert r.code == 3 and "token file" in r.err
