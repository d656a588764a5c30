"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Served, hikkoshi_server


def make_image(path: Path, size: int, seed: int = 1, data_every: int = 4 << 20) -> Path:
    """A sparse raw image with 1 MiB of pseudo-random data every ``data_every`` bytes."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, data_every):
            f.seek(off)
            f.write(rng.randbytes(min(1 << 20, size - off)))
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB sparse image with data in places."""
    return make_image(tmp_path / "disk.raw", 64 << 20)


@pytest.fixture
def served(image: Path, tmp_path: Path) -> Iterator[Served]:
    """Our server on the image, export name "disk", with a control socket."""
    with hikkoshi_server(str(image), "--export", "disk", "--control", f"unix:{tmp_path / 'ctl.sock'}") as s:
        yield s


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # libnbd and qemu honour these; a test must talk to 127.0.0.1 directly.
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("LIBNBD_DEBUG", "0")
