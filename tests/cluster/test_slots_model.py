"""The pure slot accounting and queue order, as a hypothesis state machine."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hikkoshi.cluster import slots as s
from hikkoshi.cluster.models import Limits

HOSTS = ["a", "b", "c"]
LIMITS = Limits(host_out=1, host_in=2, datastore=2, link=1, cluster=3, overrides={"host-in:c": 1})


def test_resources_and_limits() -> None:
    r = s.resources_for("a", "b", datastores=["d2", "d1", "d1"], source_site="east", destination_site="west")
    assert r == ("host-out:a", "host-in:b", "datastore:d1", "datastore:d2", "link:east~west", "cluster")
    assert s.resources_for("a", "b")[-1] == "cluster" and len(s.resources_for("a", "b")) == 3
    assert s.link("west", "east") == s.link("east", "west")
    assert s.limit_of(LIMITS, "host-in:c") == 1 and s.limit_of(LIMITS, "host-in:a") == 2


def test_reasons_say_who_and_what() -> None:
    table = s.SlotTable(
        LIMITS, {"host-out:a": frozenset({"m1"})}, (s.Waiter("m2", ("host-out:a", "cluster")),)
    )
    d = s.decide(table, s.Waiter("m3", ("host-out:a", "cluster")))
    assert not d.admit and d.position == 1
    assert d.reasons() == ["host-out:a: 1/1 slots held by m1; m2 queued ahead"]  # the cluster has room
    tight = s.SlotTable(Limits(cluster=1), {}, (s.Waiter("m2", ("host-out:b", "cluster")),))
    d = s.decide(tight, s.Waiter("m3", ("host-out:a", "cluster")))
    assert d.reasons() == ["cluster: m2 queued ahead"]  # its one free slot is owed to m2


class SlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = s.SlotTable(LIMITS)
        self.n = 0

    @rule(
        src=st.sampled_from(HOSTS),
        dst=st.sampled_from(HOSTS),
        ds=st.lists(st.sampled_from(["d1", "d2"]), max_size=2),
        wan=st.booleans(),
    )
    def enqueue(self, src: str, dst: str, ds: list[str], wan: bool) -> None:
        self.n += 1
        res = s.resources_for(
            src, dst, datastores=ds, source_site="east", destination_site="west" if wan else "east"
        )
        self.table = s.enqueue(self.table, s.Waiter(f"m{self.n}", res))

    @rule()
    def step(self) -> None:
        self._step()

    def _step(self) -> None:
        before = self.table
        started, self.table = s.admissible(before)
        order = [w.job for w in before.queue]
        for w in self.table.queue:
            # The step is maximal: whoever still waits is blocked ...
            assert not s.decide(self.table, w).admit
            # ... and not by anyone behind it (FIFO: no later waiter took a slot it was owed).
            table = self.table
            for job in started:
                if order.index(job) > order.index(w.job):
                    table = s.release(table, job)
            assert not s.decide(table, w).admit, f"{w.job} was overtaken"

    @precondition(lambda self: any(self.table.holders.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        holding = sorted({j for jobs in self.table.holders.values() for j in jobs})
        job = data.draw(st.sampled_from(holding))
        freed = self.table.held_by(job)
        self.table = s.release(self.table, job)
        heads = {r: next((w.job for w in self.table.queue if r in w.resources), None) for r in freed}
        self._step()
        # Freed slots go to the head: the first waiter needing a freed resource started, or waits
        # for some other resource; the freed one is not what stops it (nobody else took it).
        for r, head in heads.items():
            waiting = next((w for w in self.table.queue if w.job == head), None)
            if head is None or waiting is None:
                continue
            blocked = {b.resource for b in s.decide(self.table, waiting).blocked}
            assert r not in blocked, f"{head} passed over for {r}"

    @invariant()
    def never_more_holders_than_the_limit(self) -> None:
        for r, jobs in self.table.holders.items():
            assert len(jobs) <= s.limit_of(LIMITS, r)

    @invariant()
    def nobody_both_holds_and_waits(self) -> None:
        holding = {j for jobs in self.table.holders.values() for j in jobs}
        assert not holding & {w.job for w in self.table.queue}

    def teardown(self) -> None:
        # Liveness: releasing everyone, round after round, empties the queue.
        table = self.table
        for _ in range(len(table.queue) + 1):
            for job in sorted({j for jobs in table.holders.values() for j in jobs}):
                table = s.release(table, job)
            _, table = s.admissible(table)
        assert not table.queue


SlotMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestSlots = SlotMachine.TestCase
