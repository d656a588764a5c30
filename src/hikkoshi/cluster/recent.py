"""Records under one key prefix of which only the most recent are kept: each new one is put, then the
oldest (by create revision) beyond the limit are deleted; reading returns them oldest first and skips
any that do not parse (a stray or damaged value never fails the reader). Observations and the automatic
planner's runs are kept this way."""

from __future__ import annotations

from typing import TypeVar

from hikkoshi.cluster.models import Record
from hikkoshi.cluster.store import Store

R = TypeVar("R", bound=Record)


async def put_recent(store: Store, prefix: str, key: str, record: Record, keep: int) -> None:
    """Put ``record`` at ``key`` (under ``prefix``) and drop the oldest beyond ``keep`` there."""
    await store.put(key, record.to_bytes())
    got = await store.get_prefix(prefix, keys_only=True)
    if len(got.kvs) > keep:
        for kv in sorted(got.kvs, key=lambda kv: kv.create_revision)[: len(got.kvs) - keep]:
            await store.delete(kv.key)


async def read_recent(store: Store, prefix: str, model: type[R]) -> list[R]:
    """Every record under ``prefix`` as ``model``, oldest first (unreadable ones skipped)."""
    got = await store.get_prefix(prefix)
    out = []
    for kv in sorted(got.kvs, key=lambda kv: kv.create_revision):
        try:
            out.append(model.from_bytes(kv.value))
        except ValueError:
            continue
    return out
