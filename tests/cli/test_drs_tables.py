"""DRS's text for a terminal and the parsing of its options: pure."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.cli.drs_tables import (
    history_lines,
    move_line,
    parse_time,
    plan_lines,
    rule_lines,
    schedule_lines,
)
from hikkoshi.cli.rules import rule_from
from hikkoshi.cluster.models import DrsRunRecord, RuleRecord, RunMove, ScheduleRecord
from hikkoshi.drs.plan import Move, MoveKind, Plan, Why


def test_times() -> None:
    assert parse_time("+30s", 1000.0) == 1030.0
    assert parse_time("+5m", 0.0) == 300.0 and parse_time("+2h", 0.0) == 7200.0
    assert parse_time("1700000000", 0.0) == 1700000000.0
    assert parse_time("2026-12-07T18:00:00", 0.0) == parse_time("2026-12-07T18:00:00+00:00", 0.0)
    assert parse_time("2026-12-07T19:00:00+01:00", 0.0) == parse_time("2026-12-07T18:00:00", 0.0)
    for bad in ("soon", "+5d", "+s", ""):
        with pytest.raises(ValueError, match="--at"):
            parse_time(bad, 0.0)


@given(st.floats(0, 1e6), st.integers(0, 10_000), st.sampled_from("smh"))
def test_relative_times_are_ahead(now: float, n: int, unit: str) -> None:
    assert parse_time(f"+{n}{unit}", now) >= now


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(
        name="r",
        anti_affinity=None,
        affinity=None,
        vm_host=None,
        hosts=None,
        negate=False,
        must=False,
        should=False,
    )
    return argparse.Namespace(**{**base, **kw})


def test_rule_options() -> None:
    r = rule_from(_args(anti_affinity="a, b,a"))
    assert (r.kind, r.vms, r.strength) == ("anti-affinity", ("a", "b"), "must")
    r = rule_from(_args(affinity="a,b", should=True))
    assert (r.kind, r.strength) == ("affinity", "should")
    r = rule_from(_args(vm_host="a", hosts="h1,h2"))
    assert (r.kind, r.hosts) == ("run-on", ("h1", "h2"))
    assert rule_from(_args(vm_host="a", hosts="h1", negate=True)).kind == "not-run-on"
    for bad, why in (
        (_args(anti_affinity="a"), "at least two"),
        (_args(vm_host="a"), "needs --hosts"),
        (_args(affinity="a,b", hosts="h"), "go with --vm-host"),
        (_args(name="a/b", affinity="a,b"), "cannot be used"),
    ):
        with pytest.raises(ValueError, match=why):
            rule_from(bad)


def test_lines() -> None:
    m = Move("web", "a", "b", MoveKind.MIGRATE, Why.BALANCE, "a is busiest")
    lines = plan_lines(Plan((m,), 0.3, 0.1, 3, ("could not repair x",)))
    assert lines[0] == "DRS plan at level 3: imbalance 0.300 -> 0.100 after 1 move(s)"
    assert lines[1].split()[:5] == ["VM", "FROM", "TO", "WHY", "PREDICTED"]
    assert lines[2].split()[:5] == ["web", "a", "b", "balance", "-"] and lines[2].endswith("a is busiest")
    assert lines[-1] == "note: could not repair x"
    assert plan_lines(Plan((), 0.0, 0.0, 1))[1] == "no moves"
    assert move_line(2, 5, "web", "a", "b", "failed", "refused") == "[2/5] web: a -> b: failed (refused)"
    assert rule_lines([]) == ["no rules"]
    r = RuleRecord(name="apart", kind="anti-affinity", vms=("x", "y"))
    assert rule_lines([r])[1].split() == ["apart", "must", "anti-affinity", "x,y", "-"]
    s = ScheduleRecord(id="abc", vm="web", to="b", at=100.0)
    assert schedule_lines([s], now=40.0)[1].split()[-3:] == ["pending", "in", "60s"]
    assert (
        "migration m1 on a"
        in schedule_lines([s.model_copy(update={"state": "done", "migration": "m1", "runner": "a"})])[1]
    )
    assert schedule_lines([]) == ["no scheduled migrations"]
    storage = ScheduleRecord(id="st", vm="web", to="a", at=0.0, kind="storage", datastore="fast")
    assert schedule_lines([storage], now=40.0)[1].split()[2] == "a:fast"


def test_history_lines() -> None:
    assert history_lines([]) == ["no automatic DRS runs recorded"]
    handed = RunMove(
        vm="web", source="a", target="b", kind="migrate", why="rule", reason="pinned", schedule="s1"
    )
    skipped = RunMove(
        vm="db",
        source="a",
        target="c",
        kind="storage",
        why="space",
        reason="full",
        note="c names no datastore x",
    )
    run = DrsRunRecord(
        id="1-a", at=0.0, leader="a", level=2, imbalance_before=0.3, imbalance_after=0.1, threshold=0.15,
        moves=(handed, skipped), notes=("could not repair x",),
    )  # fmt: skip
    lines = history_lines([run, run.model_copy(update={"moves": (), "notes": ()})])
    assert lines[0] == (
        "1970-01-01 00:00:00 UTC  a  level 2: imbalance 0.300 (tolerance 0.150) -> 0.100, 2 move(s)"
    )
    assert lines[1] == "  web: a -> b (migrate, rule; schedule s1): pinned"
    assert lines[2] == "  db: a -> c (storage, space; not run: c names no datastore x): full"
    assert lines[3] == "  note: could not repair x" and lines[4].endswith(", no moves")


def test_a_schedule_becomes_the_agents_own_typed_request() -> None:
    from hikkoshi.agent.drs_service import DrsService

    go = ScheduleRecord(id="a", vm="web", to="b", at=0.0, storage="shared")
    assert DrsService._request(go) == ("/v1/vms/web/migrate", {"to": "b", "storage": "shared"})
    along = go.model_copy(update={"storage": "hybrid", "datastore": "big"})
    assert DrsService._request(along) == (
        "/v1/vms/web/migrate",
        {"to": "b", "storage": "hybrid", "datastore": "big"},
    )
    disks = go.model_copy(update={"kind": "storage", "to": "a", "datastore": "fast"})
    assert DrsService._request(disks) == ("/v1/vms/web/storage-migrate", {"datastore": "fast"})
