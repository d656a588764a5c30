"""``limits set`` settings and the resource rows of ``limits show``. Pure."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hikkoshi.cluster import slots as s
from hikkoshi.cluster.limit_settings import (
    KINDS,
    apply_settings,
    datastore_uuids,
    kind_limits,
    resource_rows,
)
from hikkoshi.cluster.models import Limits


def test_kinds_and_overrides() -> None:
    limits = apply_settings(
        Limits(),
        ["host-out=1", "host-in=3", "datastore=5", "link=2", "cluster=9", "host-out:alpha=4"],
    )
    assert kind_limits(limits) == {"host-out": 1, "host-in": 3, "datastore": 5, "link": 2, "cluster": 9}
    assert limits.overrides == {"host-out:alpha": 4}
    # Links are one resource whichever way round; datastores by name when the name is known.
    limits = apply_settings(limits, ["link:west~east=3", "datastore:fast=2"], {"fast": "u-1"})
    assert limits.overrides == {"host-out:alpha": 4, "link:east~west": 3, "datastore:u-1": 2}
    assert s.limit_of(limits, s.link("east", "west")) == 3
    # default: a kind back to its default, an override gone.
    limits = apply_settings(limits, ["host-out=default", "host-out:alpha=default"])
    assert limits.host_out == Limits().host_out and "host-out:alpha" not in limits.overrides


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ([], "nothing to set"),
        (["hosts=1"], "valid keys: host-out, host-in"),
        (["host-out"], "expected KEY=N"),
        (["host-out=0"], "at least 1"),
        (["host-out=two"], "at least 1"),
        (["host-out=-1"], "at least 1"),
        (["cluster:x=1"], "valid keys"),
        (["host-out:=1"], "valid keys"),
        (["link:a=1"], "link:SITE~SITE"),
        (["link:a~a=1"], "link:SITE~SITE"),
        (["host-out:a/b=1"], "cannot be used in the cluster"),
    ],
)
def test_bad_settings_say_why(settings: list[str], says: str) -> None:
    with pytest.raises(ValueError) as e:
        apply_settings(Limits(), settings)
    assert says in str(e.value)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*KINDS, "host-out:h1", "host-in:h2", "link:a~b", "datastore:d"]),
            st.one_of(st.integers(1, 50).map(str), st.just("default")),
        ),
        min_size=1,
    )
)
def test_the_last_setting_of_a_key_wins(pairs: list[tuple[str, str]]) -> None:
    limits = apply_settings(Limits(), [f"{k}={v}" for k, v in pairs])
    last = dict(pairs)
    for key, value in last.items():
        resource = key if ":" in key else None
        if resource is None:
            expected = Limits().model_dump()[KINDS[key]] if value == "default" else int(value)
            assert kind_limits(limits)[key] == expected
        elif value == "default":
            assert resource not in limits.overrides
        else:
            assert limits.overrides[resource] == int(value)


def test_resource_rows() -> None:
    table = s.SlotTable(
        Limits(host_out=1, overrides={"host-in:c": 1}),
        {"host-out:a": frozenset({"m2", "m1"}), "cluster": frozenset({"m1", "m2"})},
        (s.Waiter("m3", ("host-out:a", "datastore:d", "cluster")),),
    )
    rows = resource_rows(table)
    assert [r.resource for r in rows] == ["cluster", "datastore:d", "host-in:c", "host-out:a"]
    by = {r.resource: r for r in rows}
    assert by["host-out:a"].holders == ("m1", "m2") and by["host-out:a"].limit == 1
    assert by["host-in:c"].overridden and by["host-in:c"].holders == () and by["host-in:c"].limit == 1
    assert by["datastore:d"].limit == Limits().datastore


def test_datastore_names_that_mean_one_datastore() -> None:
    pairs = [("main", "u1"), ("main", "u2"), ("fast", "u3"), ("fast", "u3")]
    assert datastore_uuids(pairs) == {"fast": "u3"}
