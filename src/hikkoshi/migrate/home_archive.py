"""A VM's home files (disks aside) as one tar archive: how they travel to another host's agent.

Unpacking trusts nothing: only regular files with plain names (no directories, links, devices, no
``..``, no hidden or run files), within a size limit, each created new (never over an existing file),
readable by the host's root only (mode 0600: they are the VM's, whatever mode they had).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from hikkoshi.migrate.home_files import RUN_FILES, home_files

#: The most an archive may unpack to (kernels and initrds are the big ones).
MAX_ARCHIVE_BYTES = 512 << 20


class ArchiveError(ValueError):
    """The archive is not a home's files."""


def pack_home(source: Path, disk_files: set[str]) -> bytes:
    """The home files of ``source`` (as :func:`home_files` picks them) as a tar archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in home_files(source, disk_files):
            tar.add(path, arcname=path.name, recursive=False)
    return buffer.getvalue()


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name or name in RUN_FILES:
        raise ArchiveError(f"the archive has a file named {name!r}: not a home file")


def unpack_home(data: bytes, dest: Path) -> int:
    """Write the files of a :func:`pack_home` archive into ``dest``; bytes written.

    :class:`ArchiveError` for anything that is not a plain home file; files written before the error
    stay (the caller removes the home it made)."""
    if len(data) > MAX_ARCHIVE_BYTES + (1 << 20):
        raise ArchiveError(f"the archive is larger than {MAX_ARCHIVE_BYTES} bytes")
    written = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                _check_name(member.name)
                if not member.isreg():
                    raise ArchiveError(f"{member.name!r} in the archive is not a regular file")
                written += member.size
                if written > MAX_ARCHIVE_BYTES:
                    raise ArchiveError(f"the archive unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
                source = tar.extractfile(member)
                if source is None:
                    raise ArchiveError(f"{member.name!r} has no data")
                fd = os.open(dest / member.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                if member.mtime:
                    os.utime(dest / member.name, (member.mtime, member.mtime))
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a tar archive: {exc}") from None
    except FileExistsError as exc:
        raise ArchiveError(f"{Path(str(exc.filename)).name!r} is twice in the archive") from None
    return written
