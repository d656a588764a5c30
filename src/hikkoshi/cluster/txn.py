"""Transactions as plain data: what to compare, what to do. Pure (the store translates them).

etcd applies a transaction atomically at one revision: if every comparison holds, the ``success``
operations run, else the ``failure`` ones. The comparisons this package needs are on a key's
*create revision* (``0``: the key does not exist) and *mod revision* (the revision of its last
write: our fencing token), for one key or for every key under a prefix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Target(enum.Enum):
    """What a comparison looks at."""

    CREATE = "create"
    MOD = "mod"
    VALUE = "value"


class Op(enum.Enum):
    """How a comparison compares."""

    EQUAL = "=="
    LESS = "<"
    GREATER = ">"
    NOT_EQUAL = "!="


@dataclass(frozen=True)
class Compare:
    """``target(key) op operand``; with ``prefix`` it must hold for every key under ``key``."""

    key: str
    target: Target
    op: Op
    revision: int = 0
    value: bytes = b""
    prefix: bool = False

    @staticmethod
    def absent(key: str) -> Compare:
        """The key does not exist."""
        return Compare(key, Target.CREATE, Op.EQUAL, 0)

    @staticmethod
    def created_at(key: str, revision: int) -> Compare:
        """The key exists and was created at ``revision`` (it was not deleted and made again since)."""
        return Compare(key, Target.CREATE, Op.EQUAL, revision)

    @staticmethod
    def modified_at(key: str, revision: int) -> Compare:
        """The key's last write was at ``revision`` (nobody wrote it since)."""
        return Compare(key, Target.MOD, Op.EQUAL, revision)

    @staticmethod
    def unchanged_since(prefix: str, revision: int) -> Compare:
        """No key under ``prefix`` was written after ``revision`` (deletions are not seen)."""
        return Compare(prefix, Target.MOD, Op.LESS, revision + 1, prefix=True)

    @staticmethod
    def value_is(key: str, value: bytes) -> Compare:
        """The key holds exactly ``value``."""
        return Compare(key, Target.VALUE, Op.EQUAL, value=value)


@dataclass(frozen=True)
class Put:
    """Write ``value`` at ``key`` (attached to ``lease`` when not 0: deleted when the lease ends)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """Delete ``key`` (with ``prefix``: every key under it)."""

    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    """Read ``key`` (with ``prefix``: every key under it) at the transaction's revision."""

    key: str
    prefix: bool = False


Action = Put | Delete | Get
