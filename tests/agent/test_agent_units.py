"""The agent's pure parts, without processes: the home archive, the SQLite state, the timeline, option
parsing, the API's models and error statuses."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hikkoshi.agent.db import AgentDb, DbMigrationStore, StateError
from hikkoshi.agent.errors import Conflict, NotFound, status_of
from hikkoshi.agent.host import _spec_data
from hikkoshi.agent.models import MigrateBody, VmCreate
from hikkoshi.agent.timeline import draw_timeline, render_timeline, timeline_series
from hikkoshi.cli.agent import parse_datastores, parse_listen, parse_wan_links
from hikkoshi.migrate.home_archive import ArchiveError, pack_home, unpack_home
from hikkoshi.migrate.phases import Phase
from hikkoshi.migrate.record import Endpoint, MigrationRecord
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.errors import PrecheckError, RuntimeStateError, VmStartError
from hikkoshi.vm.spec import parse_spec

# --- the home archive -----------------------------------------------------------------------------------

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True).filter(
    lambda n: n not in ("supervisor.pid", "state.json", "disks.json") and not n.endswith(".bitmap")
)


@settings(max_examples=40, deadline=None)
@given(files=st.dictionaries(_names, st.binary(max_size=3000), max_size=6))
def test_home_archive_round_trip(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> None:
    src = tmp_path_factory.mktemp("src")
    dst = tmp_path_factory.mktemp("dst")
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "disk0.raw").write_bytes(b"disk")  # disks stay behind
    (src / "state.json").write_text("{}")  # and run files
    (src / ".lock").write_text("")
    written = unpack_home(pack_home(src, {"disk0.raw"}), dst)
    expected = {n: d for n, d in files.items() if n != "disk0.raw"}
    assert written == sum(len(d) for d in expected.values())
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == expected


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escape"),
        _member("/etc/passwd"),
        _member("sub/file"),
        _member(".hidden"),
        _member("supervisor.pid"),
        _member("disks.json"),
        _member("link", tarfile.SYMTYPE, "/etc/passwd"),
        _member("hard", tarfile.LNKTYPE, "vm.toml"),
        _member("dir", tarfile.DIRTYPE),
        _member("dev", tarfile.CHRTYPE),
        _member("fifo", tarfile.FIFOTYPE),
    ],
    ids=lambda m: m.name,
)
def test_home_archive_refuses_anything_but_plain_files(tmp_path: Path, member: tarfile.TarInfo) -> None:
    with pytest.raises(ArchiveError):
        unpack_home(_tar((member, b"x")), tmp_path)
    assert not (tmp_path.parent / "escape").exists()


def test_home_archive_refuses_garbage_twins_and_overwrites(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a tar"):
        unpack_home(b"garbage" * 100, tmp_path)
    with pytest.raises(ArchiveError, match="twice"):
        unpack_home(_tar((_member("a"), b"1"), (_member("a"), b"2")), tmp_path)
    (tmp_path / "b").write_bytes(b"mine")
    with pytest.raises(ArchiveError):
        unpack_home(_tar((_member("b"), b"theirs")), tmp_path)
    assert (tmp_path / "b").read_bytes() == b"mine"


def test_home_archive_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hikkoshi.migrate.home_archive as archive

    monkeypatch.setattr(archive, "MAX_ARCHIVE_BYTES", 1000)
    with pytest.raises(ArchiveError, match="more than 1000"):
        unpack_home(_tar((_member("a"), b"x" * 600), (_member("b"), b"x" * 600)), tmp_path)


# --- the database ---------------------------------------------------------------------------------------


def _record(vm: str = "web", phase: Phase = Phase.PRECHECK) -> MigrationRecord:
    return MigrationRecord(
        vm=vm,
        storage=StorageMode.HYBRID,
        source=Endpoint(datastore=Path("/a"), home=Path(f"/a/{vm}")),
        destination=Endpoint(datastore=Path("/b"), home=Path(f"/b/{vm}"), agent="http://b:8710"),
        phase=phase,
    )


def test_db_vms_migrations_and_samples(tmp_path: Path) -> None:
    db = AgentDb(tmp_path / "s.sqlite3")
    db.set_vm("web", "main", "u1", "running")
    db.set_vm("web", "other", "u1", "stopped", "moved")
    db.set_vm("db", "main", None, "incoming")
    assert {n: (r["datastore"], r["state"]) for n, r in db.vms().items()} == {
        "web": ("other", "stopped"),
        "db": ("main", "incoming"),
    }
    db.forget_vm("db")
    assert list(db.vms()) == ["web"]
    store = DbMigrationStore(db, "source")
    first, second = _record("web"), _record("db")
    second.created = first.created + 1
    store.save(second)
    store.save(first)
    first.enter(Phase.PREPARE)
    store.save(first)
    assert store.load(first.id).phase == Phase.PREPARE
    assert [r.id for r in store.all()] == [first.id, second.id]
    assert [r.id for r, role in db.migrations("db")] == [second.id]
    assert db.migration(first.id)[1] == "source"
    with pytest.raises(KeyError):
        store.load("nope")
    db.add_sample(first.id, 2.0, {"b": 2})
    db.add_sample(first.id, 1.0, {"a": 1})
    assert db.samples(first.id) == [(1.0, {"a": 1}), (2.0, {"b": 2})]
    db.close()
    again = AgentDb(tmp_path / "s.sqlite3")  # what survives a restart
    assert again.migration(first.id)[0].phase == Phase.PREPARE
    assert list(again.vms()) == ["web"]
    again.conn.execute("UPDATE migrations SET record = '{' WHERE id = ?", (second.id,))
    assert [r.id for r, _ in again.migrations()] == [first.id]  # a damaged record is skipped
    with pytest.raises(StateError):
        again.migration(second.id)
    again.close()


def test_db_refuses_a_newer_schema_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    AgentDb(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="schema 99"):
        AgentDb(path)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError):
        AgentDb(junk)


# --- the timeline ---------------------------------------------------------------------------------------


def test_timeline_series_and_png(tmp_path: Path) -> None:
    samples: list[tuple[float, dict[str, Any]]] = [
        (0.5, {"phase": "memory-precopy", "memory_done": 2 << 20, "dirty_pages_rate": 256}),
        (0.7, {"io_latency_ms": 1.5}),
        (1.0, {"phase": "storage-post", "disk_done": 1 << 20, "disk_total": 4 << 20}),
        (1.5, {"phase": "storage-post", "disk_done": 4 << 20, "disk_total": 4 << 20}),
        (1.6, {"disk_done": 1, "disk_total": 0}),  # no division by zero
    ]
    curves = timeline_series(samples)
    assert curves["memory_mib"] == ([0.5], [2.0])
    assert curves["dirty_mib_s"] == ([0.5], [1.0])
    assert curves["cache_percent"] == ([1.0, 1.5], [25.0, 100.0])
    assert curves["io_latency_ms"] == ([0.7], [1.5])
    record = _record()
    record.enter(Phase.PREPARE)
    png = tmp_path / "t.png"
    render_timeline(samples, record, png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    render_timeline([], _record(), tmp_path / "empty.png")  # nothing to plot is still a plot
    assert (tmp_path / "empty.png").stat().st_size > 0


# --- options, models, errors ----------------------------------------------------------------------------


def test_agent_options() -> None:
    assert parse_listen("127.0.0.1:8710") == ("127.0.0.1", 8710)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8710", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert parse_datastores(["a=/x", "b=y"]) == {"a": Path("/x"), "b": Path("y").absolute()}
    for items in (["a"], ["=/x"], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError):
            parse_datastores(items)
    links = parse_wan_links(["east:west=150ms,100Mbit"])
    params = links[frozenset(("west", "east"))]
    assert params.delay_ms == 75 and params.rate_bps == 100e6
    for item in ("east=1ms", "east:east=1ms", "east:west", "e:w=fast"):
        with pytest.raises(ValueError):
            parse_wan_links([item])


def test_models_bound_what_clients_send() -> None:
    VmCreate(name="web-1", memory_mib=64)
    for bad in ({"name": "../x"}, {"name": "a/b"}, {"name": ".hidden"}, {"name": ""}, {"name": "x" * 65}):
        with pytest.raises(ValidationError):
            VmCreate.model_validate({"memory_mib": 64, **bad})
    for field, value in (
        ("memory_mib", 1),
        ("disks", ["1G:fat"]),
        ("kernel", "relative"),
        ("nics", ["tap0"]),
    ):
        with pytest.raises(ValidationError):
            VmCreate.model_validate({"name": "x", "memory_mib": 64, field: value})
    with pytest.raises(ValidationError):
        VmCreate.model_validate({"name": "x", "memory_mib": 64, "unknown": 1})
    MigrateBody(to="https://10.0.0.2:8710")
    MigrateBody(to="beta")  # a host of the cluster, by name
    # http:// never: the token-bearing agent would talk to a peer that proved nothing.
    for to in ("http://10.0.0.2:8710", "10.0.0.2:8710", "ftp://x", "https://a b/"):
        with pytest.raises(ValidationError):
            MigrateBody(to=to)


def test_spec_data_makes_valid_specs() -> None:
    body = VmCreate(
        name="web", memory_mib=128, disks=["64M", "1G:thick"], nics=["user", "bridge:br0"],
        macs=["52:54:00:00:00:01"], kernel="/boot/k", append="quiet",
    )  # fmt: skip
    spec = parse_spec(_spec_data(body))
    assert [(d.size, d.provisioning) for d in spec.disks] == [(64 << 20, "thin"), (1 << 30, "thick")]
    assert [n.network for n in spec.nics] == ["user", "bridge:br0"]
    assert spec.nics[0].mac == "52:54:00:00:00:01"
    assert str(spec.boot.kernel) == "/boot/k" and spec.boot.append == "quiet"
    assert parse_spec(_spec_data(VmCreate(name="n", memory_mib=64, kernel="/k"))).nics == ()
    with pytest.raises(ValueError, match="MACs"):
        _spec_data(VmCreate(name="n", memory_mib=64, macs=["52:54:00:00:00:01"]))


def test_error_statuses() -> None:
    assert status_of(NotFound("x")) == 404
    assert status_of(Conflict("x")) == 409
    assert status_of(ValueError("x")) == 422
    assert status_of(PrecheckError(["too big"], "create")) == 422
    assert status_of(RuntimeStateError("x")) == 409
    assert status_of(VmStartError("x")) == 424


def test_timelines_drawn_from_many_tasks_open_the_fonts_once(tmp_path: Path) -> None:
    # matplotlib keeps its font files open per thread: drawn in a pool's threads, each kept its own, and
    # an agent's open files grew migration after migration (the endurance run's finding). After a first
    # round of drawings, more rounds (from fresh event loops, whose pools have fresh threads) open none.
    async def draw_round(first: int) -> None:
        await asyncio.gather(
            *(draw_timeline([], _record(), tmp_path / f"t{first + i}.png") for i in range(4))
        )

    asyncio.run(draw_round(0))
    before = _open_fonts()
    for first in (4, 8, 12):
        asyncio.run(draw_round(first))
    assert before > 0 and _open_fonts() == before


def _open_fonts() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").endswith(".ttf")
    return count
