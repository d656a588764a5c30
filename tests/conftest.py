"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support.images import make_image
from tests.support.servers import Served, hikkoshi_server

# No per-example deadlines: the suite shares two cores with guests under TCG, and a slow example is
# not a wrong one (speed is measured in bench/, never in tests).
settings.register_profile("hikkoshi", deadline=None)
settings.load_profile("hikkoshi")


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
