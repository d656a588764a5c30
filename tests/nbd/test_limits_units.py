"""The server's limits and payload memory without sockets: ServerLimits, client addresses, admission, the
budget's queue (first come, first served; never over budget) and one connection's share of it."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hikkoshi.nbd.limits import MIN_PIECE, Admission, ServerLimits, client_key
from hikkoshi.nbd.memory import ConnectionMemory, PayloadMemory, Waiter

MiB = 1 << 20

# --- ServerLimits ------------------------------------------------------------------------------------------


def test_defaults_suit_a_vm_disk_service() -> None:
    d = ServerLimits()
    assert d.idle_timeout is None  # QEMU's idle disks are never closed by default
    assert d.max_payload == 32 * MiB  # what we advertise, as before
    assert d.connection_memory <= d.memory_budget
    assert d.reserved_for_unix == 64
    # One address cannot take the whole server.
    assert d.max_connections_per_address < d.max_connections - d.reserved_for_unix


@pytest.mark.parametrize(
    "bad",
    [
        {"handshake_timeout": 0},
        {"idle_timeout": 0},
        {"max_connections": 0},
        {"max_connections_per_address": -1},
        {"unix_reserved": -1},
        {"connection_memory": 3 * MiB},  # not a power of two
        {"connection_memory": 4096},
        {"memory_budget": MiB, "connection_memory": 4 * MiB},
        {"max_payload": 100},
        {"max_payload": 1 << 32},
    ],
)
def test_limits_that_cannot_work_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ServerLimits(**bad)  # type: ignore[arg-type]


def test_unix_reserve_leaves_tcp_at_least_half() -> None:
    assert ServerLimits(max_connections=10).reserved_for_unix == 5
    assert ServerLimits(max_connections=1).reserved_for_unix == 0


@pytest.mark.parametrize(
    ("length", "size"),
    [(0, MIN_PIECE), (1, MIN_PIECE), (MIN_PIECE + 1, 2 * MIN_PIECE), (3 * MiB, 4 * MiB), (48 * MiB, 4 * MiB)],
)
def test_piece_sizes_are_powers_of_two_within_the_connection(length: int, size: int) -> None:
    assert ServerLimits().piece_size(length) == size


# --- client addresses and admission ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        (("192.0.2.7", 50000), "192.0.2.7"),
        (("::ffff:192.0.2.7", 50000, 0, 0), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 50000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 50001, 0, 0), "2001:db8:1:2::/64"),  # same /64, same client
        (("fe80::1%eth0", 1, 0, 2), "fe80::/64"),
        ("", None),  # uvloop's Unix socket peer
        ("/run/x.sock", None),
        (None, None),
        ((), None),
    ],
)
def test_client_key(peer: object, key: str | None) -> None:
    assert client_key(peer) == key


def test_admission_caps_an_address_and_keeps_a_reserve_for_unix_clients() -> None:
    a = Admission(ServerLimits(max_connections=10, max_connections_per_address=3, unix_reserved=2))
    for _ in range(3):
        assert a.refusal("10.0.0.1", unix=False) is None
        a.enter("10.0.0.1", unix=False)
    assert a.refusal("10.0.0.1", unix=False) is not None  # its cap
    for i in range(5):
        assert a.refusal(f"10.0.0.{i + 2}", unix=False) is None
        a.enter(f"10.0.0.{i + 2}", unix=False)
    assert (a.total, a.tcp) == (8, 8)
    assert a.refusal("10.0.0.99", unix=False) is not None  # TCP may not take the reserve
    assert a.refusal(None, unix=True) is None  # a Unix client may
    a.enter(None, unix=True)
    a.enter(None, unix=True)
    assert a.refusal(None, unix=True) == "server full"
    a.leave("10.0.0.1", unix=False)
    assert a.refusal("10.0.0.1", unix=False) is None  # below its cap, and TCP below its share
    a.enter("10.0.0.1", unix=False)
    assert a.refusal(None, unix=True) == "server full"
    a.leave(None, unix=True)
    assert (a.total, a.tcp) == (9, 8) and a.by_address["10.0.0.1"] == 3


def test_unix_clients_beyond_the_reserve_leave_tcp_less_room() -> None:
    a = Admission(ServerLimits(max_connections=10, unix_reserved=2))
    for _ in range(7):
        a.enter(None, unix=True)
    for i in range(3):
        assert a.refusal(f"10.0.0.{i}", unix=False) is None
        a.enter(f"10.0.0.{i}", unix=False)
    assert a.refusal("10.0.0.9", unix=False) == "server full"


def test_no_cap_per_address_when_zero() -> None:
    a = Admission(ServerLimits(max_connections=100, max_connections_per_address=0))
    for _ in range(50):
        assert a.refusal("10.0.0.1", unix=False) is None
        a.enter("10.0.0.1", unix=False)


# --- the budget's queue -----------------------------------------------------------------------------------


def test_reservations_wait_in_order_and_never_exceed_the_budget() -> None:
    mem = PayloadMemory(10)
    granted: list[str] = []
    assert mem.reserve(6)
    big = mem.wait(8, lambda: granted.append("big"))
    # Fits, but someone waits before it: no jumping the queue.
    assert not mem.reserve(1)
    small = mem.wait(1, lambda: granted.append("small"))
    assert granted == [] and mem.waiting == 2
    mem.release(6)
    assert granted == ["big", "small"] and big.granted and small.granted
    assert mem.reserved == 9
    with pytest.raises(ValueError):
        mem.wait(11, lambda: None)


def test_a_cancelled_head_lets_the_next_one_through() -> None:
    mem = PayloadMemory(10)
    granted: list[int] = []
    assert mem.reserve(5)
    head = mem.wait(8, lambda: granted.append(8))
    mem.wait(4, lambda: granted.append(4))
    assert granted == []
    mem.cancel(head)  # its connection went away
    assert granted == [4] and mem.reserved == 9
    mem.cancel(head)  # twice is harmless


def test_cached_buffers_yield_to_reservations() -> None:
    mem = PayloadMemory(4 * MIN_PIECE)
    assert mem.reserve(4 * MIN_PIECE)
    bufs = [mem.take(MIN_PIECE) for _ in range(4)]
    mem.release(4 * MIN_PIECE)
    for buf in bufs:
        mem.give(buf)
    assert mem.cached == 4 * MIN_PIECE
    assert mem.reserve(2 * MIN_PIECE)  # drops cached buffers to make room
    assert mem.cached == 2 * MIN_PIECE and mem.reserved + mem.cached <= mem.budget
    again = mem.take(MIN_PIECE)
    assert again in bufs  # reused, not allocated


class BudgetMachine(RuleBasedStateMachine):
    """Random reservations, waits, releases and cancellations against a model of the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = PayloadMemory(1000)
        self.held: list[int] = []  # granted or reserved, not yet released
        self.queue: list[tuple[Waiter, int]] = []  # in arrival order
        self.grants: list[int] = []  # ids, in the order granted
        self.count = 0

    def _on_grant(self, ident: int) -> None:
        self.grants.append(ident)

    @rule(n=st.integers(1, 600))
    def reserve(self, n: int) -> None:
        fits = not self.queue and self.mem.reserved + n <= 1000
        assert self.mem.reserve(n) == fits
        if fits:
            self.held.append(n)

    @rule(n=st.integers(1, 1000))
    def wait(self, n: int) -> None:
        self.count += 1
        ident = self.count
        waiter = self.mem.wait(n, functools.partial(self._on_grant, ident))
        self.queue.append((waiter, ident))
        self._collect()

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        n = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.mem.release(n)
        self._collect()

    @precondition(lambda self: bool(self.queue))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiter, _ = self.queue.pop(data.draw(st.integers(0, len(self.queue) - 1)))
        self.mem.cancel(waiter)
        self._collect()

    @rule(n=st.sampled_from([MIN_PIECE // 1024, 1, 7]))
    def churn_cache(self, n: int) -> None:
        self.mem.give(bytearray(n))

    def _collect(self) -> None:
        # Grants happen in queue order: every granted waiter was ahead of every one still waiting.
        still: list[tuple[Waiter, int]] = []
        granted_now: list[int] = []
        for waiter, ident in self.queue:
            if waiter.granted:
                assert not still, "a later waiter was granted before an earlier one"
                granted_now.append(ident)
                self.held.append(waiter.nbytes)
            else:
                still.append((waiter, ident))
        assert self.grants[len(self.grants) - len(granted_now) :] == granted_now
        self.queue = still

    @invariant()
    def within_budget(self) -> None:
        assert self.mem.reserved == sum(self.held)
        assert self.mem.reserved <= 1000
        assert self.mem.reserved + self.mem.cached <= 1000 or self.mem.cached == 0
        # Nobody waits who could have been granted.
        if self.queue:
            assert self.mem.reserved + self.queue[0][0].nbytes > 1000


TestBudget = BudgetMachine.TestCase
TestBudget.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# --- one connection's share -------------------------------------------------------------------------------


def test_a_connection_waits_for_its_own_memory_then_is_woken() -> None:
    mem = PayloadMemory(100)
    wakes: list[str] = []
    conn = ConnectionMemory(mem, 10, lambda: wakes.append("wake"))
    assert conn.try_reserve(8)
    conn.drain += 8
    assert not conn.try_reserve(4)  # 12 > its 10
    assert conn.over_own and conn.waiting and wakes == []
    conn.drained()
    assert wakes == ["wake"] and not conn.waiting
    assert conn.try_reserve(4) and mem.reserved == 4


def test_a_grant_becomes_the_connections_own() -> None:
    mem = PayloadMemory(10)
    wakes: list[str] = []
    other = ConnectionMemory(mem, 10, lambda: None)
    conn = ConnectionMemory(mem, 10, lambda: wakes.append("wake"))
    assert other.try_reserve(10)
    assert not conn.try_reserve(6) and conn.waiter is not None
    other.release(10)
    assert wakes == ["wake"] and conn.spare == 6 and conn.reserved == 6
    assert conn.try_reserve(6) and conn.spare == 0 and mem.reserved == 6
    # A grant that goes unused (the request went another way) is given back before anything else.
    assert other.try_reserve(4)
    conn.release(6)
    assert conn.try_reserve(6)


def test_a_connection_that_goes_away_gives_back_everything() -> None:
    mem = PayloadMemory(10)
    a = ConnectionMemory(mem, 10, lambda: None)
    b = ConnectionMemory(mem, 10, lambda: None)
    c = ConnectionMemory(mem, 10, lambda: None)
    assert a.try_reserve(7)
    assert not b.try_reserve(5)  # waits
    assert not c.try_reserve(3)  # waits behind b
    b.free()  # leaves the queue: c is next, and fits
    assert c.reserved == 3
    a.free()
    a.release(7)  # late releases of a freed connection are ignored
    assert mem.reserved == 3
    c.free()
    assert mem.reserved == 0 and mem.waiting == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), max_size=60), st.randoms())
def test_many_connections_never_exceed_their_shares(ops: list[tuple[int, int]], rnd: random.Random) -> None:
    mem = PayloadMemory(60)
    conns = [ConnectionMemory(mem, 25, lambda: None) for _ in range(4)]
    for who, n in ops:
        conn = conns[who]
        if rnd.random() < 0.6:
            conn.try_reserve(n)
        elif conn.reserved - conn.spare:
            conn.release(min(n, conn.reserved - conn.spare))
        assert all(c.reserved <= 25 for c in conns)
        assert mem.reserved == sum(c.reserved for c in conns) <= 60
