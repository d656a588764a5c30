"""Helpers for the dashboard's tests: the dashboard as a real process (port 0, stopped by pid), and
Debian's chromium driven by Playwright (never a browser download)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
_LISTENING = re.compile(r"listening on (\S+)")
REPO = Path(__file__).resolve().parents[2]


def screenshots_dir() -> Path:
    """Where the tests save screenshots: ``$HIKKOSHI_SCREENSHOTS``, else ``build/screenshots``."""
    path = Path(os.environ.get("HIKKOSHI_SCREENSHOTS") or REPO / "build" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def need_chromium() -> None:
    """Skip unless Debian's chromium and the Playwright package are installed."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless chromium, closed (with Playwright's driver) afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def dashboard_proc(log: Path, *args: str, timeout: float = 60.0) -> Iterator[str]:
    """``hikkoshi dashboard --listen 127.0.0.1:0 ARGS`` running; its URL. Stopped by pid afterwards."""
    cmd = [sys.executable, "-m", "hikkoshi", "dashboard", "--listen", "127.0.0.1:0", *args]
    with log.open("a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = _LISTENING.search(line)
            if m:
                break
            if not line and proc.poll() is not None:
                raise AssertionError(f"the dashboard did not start:\n{log.read_text()[-3000:]}")
        else:
            raise AssertionError("the dashboard did not say where it listens")
        yield m[1]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
