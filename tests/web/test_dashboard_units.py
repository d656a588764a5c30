"""The dashboard's pure parts: state words, progress that never goes back, time left, the timeline's
rows, rounds, downtime and predicted vs actual, predictions with their assumptions, and sessions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.migrate.phases import FORWARD, Phase
from hikkoshi.web.auth import Sessions
from hikkoshi.web.prediction import LinkAssumption, parse_link, prediction_for
from hikkoshi.web.progress import STATES, Eta, Ratchet, moving, percent, state_word
from hikkoshi.web.timeline import (
    COLUMNS,
    chart_row,
    disk_split,
    downtime,
    memory_rounds,
    phase_spans,
    predicted_vs_actual,
)
from hikkoshi.web.views import DiskView, VmView
from tests.support.fake_source import finished_migration, samples


def test_state_words() -> None:
    assert state_word("done", False) == "done"
    assert state_word("rolled-back", False) == "rolled back"
    assert state_word("failed", False) == "failed"
    assert state_word("rollback", True) == "rolling back"
    assert state_word("memory-precopy", True) == "running"
    assert state_word("memory-precopy", False) == "queued"  # waits for its agent to take it up again
    assert state_word("precheck", True, queued=True) == "queued"
    assert {state_word(p.value, r) for p in Phase for r in (True, False)} <= set(STATES)


def test_percent_goes_forward_with_the_phases() -> None:
    values = [percent(p.value, {}) for p in FORWARD]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 100.0
    half = {"phase": "memory-precopy", "memory_done": 50, "memory_remaining": 50}
    assert percent("memory-precopy", {}) < percent("memory-precopy", half) < percent("switchover", {})
    disk = {"phase": "storage-post", "disk_done": 3, "disk_total": 4}
    assert percent("storage-post", {}) < percent("storage-post", disk) < percent("cleanup", {})
    assert percent("rollback", {}) == 0.0 and percent("nonsense", {}) == 0.0


@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=50))
def test_ratchet_never_goes_back(values: list[float]) -> None:
    ratchet = Ratchet()
    shown = [ratchet("p", v) for v in values]
    assert shown == sorted(shown) and shown[-1] == max(values)


def test_memory_progress_that_falls_is_shown_as_it_was() -> None:
    # A new pre-copy pass: more remaining than before, sent/(sent+remaining) falls; the bar does not.
    ratchet = Ratchet()
    a = ratchet(
        "p", percent("memory-precopy", {"phase": "memory-precopy", "memory_done": 90, "memory_remaining": 10})
    )
    b = ratchet(
        "p", percent("memory-precopy", {"phase": "memory-precopy", "memory_done": 95, "memory_remaining": 40})
    )
    assert b == a


def test_eta_from_the_rate_between_samples() -> None:
    eta = Eta(alpha=1.0)
    assert eta.update("disk", 0.0, 0, 100) is None  # no rate yet
    assert eta.update("disk", 1.0, 10, 90) == 9.0
    assert eta.update("memory", 2.0, 5, 10) is None  # something else moves: a new rate
    assert eta.update("memory", 3.0, 10, 0) == 0.0
    assert moving({"phase": "memory-precopy", "memory_done": 1, "memory_remaining": 2}) == (
        "memory",
        1.0,
        2.0,
    )
    assert moving({"phase": "storage-post", "disk_done": 1, "disk_total": 3}) == ("disk", 1.0, 2.0)
    assert moving({"phase": "home-files"}) is None


def test_chart_rows() -> None:
    rows = [chart_row(s) for s in samples()]
    assert all(len(r) == len(COLUMNS) for r in rows)
    assert rows[0][:3] == [4.1, 40.0, 1.0]  # 256 pages/s of 4 KiB = 1 MiB/s
    assert rows[2][3] == 12.5 and rows[2][5] == 1.0
    assert rows[3][6] == 0.5 and rows[3][7] is None and rows[4][7] == 0.7


def test_rounds_downtime_split_and_spans() -> None:
    rounds = memory_rounds(samples())
    assert [(r["round"], r["bytes"]) for r in rounds] == [(1, 40 << 20), (2, 50 << 20)]
    m = finished_migration()
    assert downtime(m.record, m.report) == {
        "start": 5.0,
        "end": 5.08,
        "ms": 80.0,
        "qemu_ms": 40.0,
        "exact": True,
    }
    # While it runs there is no report yet: the switchover phase as recorded.
    assert downtime(m.record, {}) == {"start": 5.0, "end": 6.0, "ms": 1000.0, "qemu_ms": None, "exact": False}
    assert disk_split(samples(), m.report) == {"demand": 1 << 20, "background": 7 << 20}
    assert disk_split(samples(), {}) == {"demand": 0, "background": 1 << 20}
    assert disk_split([], {}) is None
    spans = phase_spans({"phases": [{"phase": "precheck", "started": 100.0, "seconds": None}]}, 102.5)
    assert spans == [{"phase": "precheck", "start": 0.0, "end": 2.5}]


def test_predicted_vs_actual() -> None:
    m = finished_migration()
    predicted = {"total_time_ms": 8000, "time_to_destination_ms": 6000, "downtime_ms": 30.0,
                 "memory_bytes": 96 << 20, "disk_bytes": 8 << 20, "rounds": 2}  # fmt: skip
    rows = {r["label"]: (r["predicted"], r["actual"]) for r in predicted_vs_actual(predicted, m.report)}
    assert rows["total time"] == (8.0, 10.0)
    assert rows["downtime"] == (30.0, 40.0)
    assert rows["memory sent"] == (96.0, 100.0)
    assert rows["disk moved"] == (8.0, 8.0)
    assert rows["memory passes"] == (2, 2)
    assert predicted_vs_actual(None, m.report) == []


def test_prediction_says_what_it_assumed() -> None:
    vm = VmView(
        name="web", host="alpha", state="running", memory_mib=256, disks=[DiskView(name="d", size=1 << 30)]
    )
    out = prediction_for(vm, "hybrid", LinkAssumption(bandwidth=125e6, rtt_ms=1.0))
    p = out["prediction"]
    assert p["converges"] and p["disk_bytes"] >= 1 << 30 and p["memory_bytes"] >= 256 << 20
    assert any("dirty rate unknown" in a for a in out["assumptions"])
    shared = prediction_for(vm.model_copy(update={"last_dirty_rate_mib_s": 5.0}), "shared", LinkAssumption())
    assert shared["prediction"]["disk_bytes"] == 0
    assert any("5 MiB/s" in a for a in shared["assumptions"])
    assert "error" in prediction_for(vm.model_copy(update={"memory_mib": None}), "hybrid", LinkAssumption())
    assert parse_link("100Mbit,20ms") == LinkAssumption(bandwidth=12.5e6, rtt_ms=20.0)
    with pytest.raises(ValueError):
        parse_link("fast")


def test_sessions() -> None:
    sessions = Sessions("s3cret", ttl=0.2)
    assert sessions.login("wrong") is None and sessions.login("") is None
    sid = sessions.login("s3cret\n")
    assert sid is not None and "s3cret" not in sid and sessions.valid(sid)
    assert not sessions.valid(None) and not sessions.valid("forged")
    time.sleep(0.25)
    assert not sessions.valid(sid)  # expired
    other = sessions.login("s3cret")
    sessions.logout(other)
    assert not sessions.valid(other)


def test_command_line_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hikkoshi.cli.main import main

    with pytest.raises(SystemExit):
        main(["dashboard", "--token-file", "t"])  # neither --agent nor --etcd
    capsys.readouterr()
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    assert (
        main(
            ["dashboard", "--agent", "http://127.0.0.1:1", "--listen", "nowhere", "--token-file", str(token)]
        )
        == 2
    )
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert main(["dashboard", "--agent", "http://127.0.0.1:1", "--token-file", str(tmp_path / "none")]) == 2
    assert "token file" in capsys.readouterr().err
    assert (
        main(["dashboard", "--agent", "http://127.0.0.1:1", "--token-file", str(token), "--link", "x"]) == 2
    )
    assert "--link" in capsys.readouterr().err
