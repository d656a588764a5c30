"""How the ext reader says no. Pure: two exception classes, nothing else.

Whatever raises :class:`Malformed` makes the caller treat what it was reading (a file system, a partition
table, the journal, the inode tables) as used; :class:`Unreadable` is the one raised by the disk reader.
"""

from __future__ import annotations


class Malformed(Exception):
    """Data that does not check out: the file system (or table) is treated as fully used."""


class Unreadable(Malformed):
    """A read outside the disk, or one that came back short."""
