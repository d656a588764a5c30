"""Copying a VM's home to another datastore, disks aside (seed 000: home files go first)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hikkoshi.vm.disk_serving import PLAN_FILE

#: Files of a home that belong to one run of the VM (or to a migration): never copied.
RUN_FILES = frozenset({".lock", "supervisor.pid", "state.json", PLAN_FILE})
#: Files the VM or its supervisor rewrite: copied (a hard link would be changed on both sides).
_CHANGING = (".log", ".1", ".toml", ".json", ".fd")


def home_files(source: Path, disk_files: set[str]) -> list[Path]:
    """The files of a home that go to a new home: all but the disks, run files and disk side files."""
    out = []
    for entry in sorted(source.iterdir()):
        if entry.name in RUN_FILES or entry.name in disk_files or not entry.is_file():
            continue
        if entry.name.endswith((".bitmap", ".hikkoshi-move")) or entry.name.startswith("."):
            continue
        out.append(entry)
    return out


def copy_home_files(source: Path, dest: Path, disk_files: set[str]) -> int:
    """Copy every file of ``source`` but the disks and the run files into ``dest``; bytes copied.

    Boot files (kernel, initrd) are hard-linked when both homes share a file system: they are large
    and never rewritten in place."""
    copied = 0
    for entry in home_files(source, disk_files):
        target = dest / entry.name
        try:
            if entry.name.endswith(_CHANGING):
                raise OSError("copied, not linked")
            os.link(entry, target)
        except OSError:
            shutil.copy2(entry, target)
        copied += entry.stat().st_size
    return copied
