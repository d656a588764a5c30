"""The journal of a storage move: which file is authoritative if the server dies during the move.

It lives beside the source, ``IMAGE.hikkoshi-move``, and is written (and fsynced, with its directory)
before the destination file is created and again just before the export switches files:

- ``copying``: the source is authoritative; the destination is a partial copy, to be deleted.
- ``switched``: the destination was complete and flushed when the export switched to it; the guest may
  have written to it since, so the source is stale and is deleted.

``nbd serve IMAGE`` calls :func:`recover` first, finishing or undoing whatever the journal describes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("hikkoshi.block.move")

SUFFIX = ".hikkoshi-move"
State = Literal["copying", "switched"]


class MoveJournalError(Exception):
    """A journal that cannot be acted on safely."""


@dataclass(frozen=True)
class Journal:
    source: Path
    dest: Path
    state: State

    @staticmethod
    def path_for(source: Path) -> Path:
        return source.with_name(source.name + SUFFIX)

    def write(self) -> None:
        """Replace the journal atomically and durably."""
        path = self.path_for(self.source)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps({"source": str(self.source), "dest": str(self.dest), "state": self.state})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def remove(self) -> None:
        self.path_for(self.source).unlink(missing_ok=True)
        fsync_dir(self.source.parent)

    @classmethod
    def load(cls, source: Path) -> Journal | None:
        path = cls.path_for(source)
        try:
            raw = json.loads(path.read_text())
            state = raw["state"]
            if state not in ("copying", "switched"):
                raise ValueError(f"unknown state {state!r}")
            return cls(Path(raw["source"]), Path(raw["dest"]), state)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MoveJournalError(
                f"unreadable move journal {path}: {exc}; inspect it and remove it"
            ) from None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(image: Path) -> Path:
    """Finish or undo an interrupted move of ``image``; return the file to serve."""
    journal = Journal.load(image)
    if journal is None:
        return image
    if journal.source.resolve() != image.resolve():
        raise MoveJournalError(f"move journal beside {image} names another source, {journal.source}")
    if journal.state == "copying":
        journal.dest.unlink(missing_ok=True)
        fsync_dir(journal.dest.parent)
        journal.remove()
        log.warning("removed the partial copy %s of an interrupted move; serving %s", journal.dest, image)
        return image
    if not journal.dest.exists():
        raise MoveJournalError(
            f"{image} was moved to {journal.dest}, which is missing; {image} is stale. Nothing was deleted."
        )
    image.unlink(missing_ok=True)
    fsync_dir(image.parent)
    journal.remove()
    log.warning("finished the interrupted move of %s: serving %s", image, journal.dest)
    return journal.dest
