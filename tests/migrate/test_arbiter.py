"""Which way a migration taken over after a crash goes (pure), over every combination of what the two
sides may say, checked against the rule users trust: the VM runs in exactly one place."""

from __future__ import annotations

import itertools

from hikkoshi.migrate.arbiter import DestinationView, SourceView, Way, decide

BOOLS = (False, True)


def _cases() -> list[tuple[bool, SourceView, DestinationView]]:
    out = []
    for rec, alive, src_commit, reach, exists, completed, ran in itertools.product(BOOLS, repeat=7):
        if ran and not (exists and completed):
            continue  # a destination that ran had the whole stream
        if (rec or src_commit) is False and ran:
            continue  # never our doing; checked separately below
        out.append((rec, SourceView(alive, src_commit), DestinationView(reach, exists, completed, ran)))
    return out


def test_every_case_keeps_the_vm_in_one_place() -> None:
    for record_committed, src, dst in _cases():
        decision = decide(record_committed, src, dst)
        committed = record_committed or src.committed
        if decision.way == Way.BACK:
            # The source runs again: only if the destination never ran and never may.
            assert not committed and not dst.ran, (record_committed, src, dst)
            # Going back while the destination holds the only complete copy would lose the guest.
            assert src.qemu_alive or not (dst.exists and dst.stream_completed) or not dst.reachable
        if decision.way == Way.FORWARD:
            # The destination is the VM: committed, or the source's QEMU is gone and it holds the guest.
            assert committed or (not src.qemu_alive and dst.stream_completed) or dst.ran
            # Only a committed migration goes forward to a destination whose VM is gone (to wait
            # until it is started there again: the source never runs again).
            assert dst.reachable and (dst.exists or committed)
        if decision.way == Way.WAIT:
            assert not dst.reachable
        assert decision.way != Way.FAILED  # every combination has a safe way
        assert decision.reason


def test_a_destination_that_ran_wins_even_without_a_commit() -> None:
    d = decide(False, SourceView(True, False), DestinationView(True, True, True, True))
    assert d.way == Way.FORWARD


def test_the_common_cases() -> None:
    # The job died before the commit: back.
    assert decide(False, SourceView(True, False), DestinationView(True, True, False)).way == Way.BACK
    # It died between the source supervisor's commit and the record's: forward.
    assert decide(False, SourceView(True, True), DestinationView(True, True, True)).way == Way.FORWARD
    # The destination's agent is down after the commit: wait for it.
    assert decide(True, SourceView(True, True), DestinationView(False)).way == Way.WAIT
    # The source's QEMU died after the stream: the destination is the guest now.
    assert decide(False, SourceView(False, False), DestinationView(True, True, True)).way == Way.FORWARD
    # Committed, and the destination's VM died: forward all the same (started there again).
    assert decide(True, SourceView(True, True), DestinationView(True, False)).way == Way.FORWARD
