"""Limits as people write and read them: ``host-out=2 link:east~west=1``, and who holds which slots. Pure.

A setting is ``KEY=N``: ``KEY`` is a kind of resource (``host-out``, ``host-in``, ``datastore``,
``link``, ``cluster``: the limit of every resource of that kind) or one resource
(``host-out:HOST``, ``host-in:HOST``, ``datastore:NAME|UUID``, ``link:SITE~SITE``: an override of its
kind's limit). ``N`` is a whole number of at least 1, or ``default`` (a kind back to the default,
an override removed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hikkoshi.cluster import slots as s
from hikkoshi.cluster.keys import segment
from hikkoshi.cluster.models import Limits

KINDS: dict[str, str] = {
    "host-out": "host_out",
    "host-in": "host_in",
    "datastore": "datastore",
    "link": "link",
    "cluster": "cluster",
}
"""A kind's name on the command line -> its field in :class:`Limits`."""

VALID_KEYS = (
    "host-out, host-in, datastore, link, cluster (every resource of that kind), or one resource: "
    "host-out:HOST, host-in:HOST, datastore:NAME|UUID, link:SITE~SITE"
)

DEFAULT = "default"


def _count(key: str, text: str) -> int | None:
    """N (None for ``default``)."""
    if text == DEFAULT:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{key}={text}: the limit is a whole number of at least 1 (or 'default')")
    return int(text)


def resource_of(key: str, datastores: Mapping[str, str]) -> str:
    """The resource an override key names (``datastore:NAME`` -> ``datastore:UUID`` when known)."""
    kind, _, what = key.partition(":")
    if kind not in KINDS or kind == s.CLUSTER or not what:
        raise ValueError(f"unknown limit {key!r}; valid keys: {VALID_KEYS}")
    if kind == "link":
        a, tilde, b = what.partition("~")
        if not tilde or not a or not b or a == b:
            raise ValueError(f"{key!r}: a link is link:SITE~SITE (two different sites)")
        resource = s.link(a, b)
    elif kind == "datastore":
        resource = s.datastore(datastores.get(what, what))
    else:
        resource = f"{kind}:{what}"
    return segment(resource, "resource")


def apply_settings(
    current: Limits, settings: Sequence[str], datastores: Mapping[str, str] | None = None
) -> Limits:
    """``current`` with the ``KEY=N`` settings applied; ValueError (naming the valid keys) if one is bad.

    ``datastores``: datastore name -> uuid, so that overrides can name datastores."""
    if not settings:
        raise ValueError(f"nothing to set: give KEY=N, KEY one of {VALID_KEYS}")
    fields = current.model_dump()
    defaults = Limits().model_dump()
    overrides = dict(current.overrides)
    for item in settings:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"{item!r}: expected KEY=N, KEY one of {VALID_KEYS}")
        n = _count(key, value)
        if key in KINDS:
            fields[KINDS[key]] = defaults[KINDS[key]] if n is None else n
            continue
        resource = resource_of(key, datastores or {})
        if n is None:
            overrides.pop(resource, None)
        else:
            overrides[resource] = n
    fields["overrides"] = overrides
    return Limits.model_validate(fields)


def kind_limits(limits: Limits) -> dict[str, int]:
    """Each kind's limit, by its command-line name."""
    values = limits.model_dump()
    return {kind: int(values[field]) for kind, field in KINDS.items()}


@dataclass(frozen=True)
class ResourceRow:
    """A resource in use, waited for, or with a limit of its own: its limit and the migrations holding it."""

    resource: str
    limit: int
    holders: tuple[str, ...]
    overridden: bool


def resource_rows(table: s.SlotTable) -> list[ResourceRow]:
    """Every resource held, waited for or overridden, by name."""
    names: set[str] = set(table.holders) | set(table.limits.overrides)
    for w in table.queue:
        names.update(w.resources)
    return [
        ResourceRow(
            resource=r,
            limit=s.limit_of(table.limits, r),
            holders=tuple(sorted(table.holders.get(r, frozenset()))),
            overridden=r in table.limits.overrides,
        )
        for r in sorted(names)
    ]


def datastore_uuids(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Datastore name -> uuid, for names that mean one datastore only (a name two datastores share
    is left out: it must be given by uuid)."""
    seen: dict[str, set[str]] = {}
    for name, uuid in pairs:
        seen.setdefault(name, set()).add(uuid)
    return {name: next(iter(uuids)) for name, uuids in seen.items() if len(uuids) == 1}
