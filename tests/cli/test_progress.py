"""Progress on the command line: a bar that fits 80 columns with every figure whole, plain lines through a
pipe; the figures themselves; and `hikkoshi nbd move` both ways, as a user sees it."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.console import Console

from hikkoshi.cli import figures
from hikkoshi.cli.progress import LineProgress, _Bar, _State
from tests.support.servers import Served

MiB = 1 << 20
GiB = 1 << 30
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_SIZES = re.compile(r"\d+\.\d/\d+\.\d [KMGT]?i?B")
_ETA = re.compile(r"ETA (\d+:\d\d:\d\d|-:--:--)")


def test_figures() -> None:
    assert figures.size_pair(70_000_000, 256 << 20) == "66.8/256.0 MiB"
    assert figures.size_pair(1023 * GiB, 1023 * GiB) == "1023.0/1023.0 GiB"
    assert figures.size_pair(5, 10) == "5/10 B"
    assert figures.size_pair(3 << 20, None) == "3.0 MiB"
    assert figures.rate(45.2 * (1 << 20)) == "45.2 MiB/s" and figures.rate(None) == "- B/s"
    assert figures.duration(83) == "0:01:23" and figures.duration(36000) == "10:00:00"
    assert figures.duration(None) == figures.duration(float("nan")) == "-:--:--"
    assert figures.eta(10, 110, 25.0) == 4.0
    assert figures.eta(10, None, 25.0) is None and figures.eta(10, 110, 0.0) is None


def test_meter_measures_over_its_window() -> None:
    meter = figures.Meter(window=5.0)
    meter.add(0.0, 0)
    assert meter.rate() is None
    for t in range(1, 11):
        meter.add(float(t), t * 100 if t <= 5 else 500 + (t - 5) * 300)
    assert meter.rate() == pytest.approx(300, rel=0.25)  # the last seconds, not the whole run
    meter.add(11.0, 10)  # a new pass counts from zero again
    assert meter.rate() is None


def _render(state: _State, width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, color_system=None).print(_Bar(state))
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 60])
def test_bar_fits_the_terminal_without_cutting_figures(width: int) -> None:
    now = [100.0]
    state = _State(clock=lambda: now[0], started=0.0)
    state.set("resume-destination", 0, 1000 * GiB, None, "")
    now[0] = 4000.0
    state.set("resume-destination", 999 * GiB, 1000 * GiB, 987.6 * MiB, "memory, iteration 12 · " * 5)
    lines = _render(state, width)
    assert len(lines) == 2 and all(len(line) <= width for line in lines), lines
    assert "999.0/1000.0 GiB" in lines[0] and "987.6 MiB/s" in lines[0] and "ETA 0:00:01" in lines[0]
    assert "elapsed 1:06:40" in lines[1]
    if width == 80:
        assert lines[0].startswith("resume-destination ━")


def test_plain_lines_on_phase_changes_and_every_few_seconds() -> None:
    now = [0.0]
    out = io.StringIO()
    report = LineProgress("migrate", out, interval=5.0, clock=lambda: now[0])
    report.update("precheck")
    for t in range(1, 13):
        now[0] = float(t)
        report.update("memory-precopy", t * MiB, 64 * MiB, detail="memory, iteration 1")
    report.close()  # the last state, not printed yet (t=12), is
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["precheck"] + ["memory-precopy"] * 4
    assert lines[0] == "migrate: precheck  elapsed 0:00:00"
    assert lines[1].startswith("migrate: memory-precopy  1.0/64.0 MiB  ")
    figures_12s = "12.0/64.0 MiB  1.0 MiB/s  ETA 0:00:52  elapsed 0:00:12"
    assert lines[-1] == f"migrate: memory-precopy  {figures_12s}  memory, iteration 1"


def _move_command(tmp_path: Path) -> list[str]:
    """Move the served image (16 MiB of data) at 4 MB/s: a few seconds of progress."""
    control = f"unix:{tmp_path / 'ctl.sock'}"
    cmd = [sys.executable, "-m", "hikkoshi", "nbd", "move", "--control", control]
    return [*cmd, "--to", str(tmp_path / "to.raw"), "--bandwidth", "4M"]


def _run_in_terminal(cmd: list[str], columns: int, timeout: float = 120) -> tuple[int, str]:
    """Run ``cmd`` on a pseudo-terminal of ``columns`` columns; its exit status and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not data:
                break
            out += data
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.close(master)
    return code, out.decode(errors="replace")


def test_nbd_move_bar_on_an_80_column_terminal(served: Served, tmp_path: Path) -> None:
    code, output = _run_in_terminal(_move_command(tmp_path), columns=80)
    assert code == 0, output
    lines = [line for line in re.split(r"[\r\n]+", _ANSI.sub("", output)) if line.strip()]
    bars = [line for line in lines if line.startswith(("copying", "done", "preparing"))]
    assert bars, lines
    assert all(len(line) <= 80 for line in bars + [line for line in lines if "elapsed" in line]), lines
    for line in bars:
        assert _SIZES.search(line) and _ETA.search(line), line  # whole figures, none cut with "…"
        assert "…" not in line, line
    assert bars[-1].startswith("done") and "16.0/16.0 MiB" in bars[-1]
    assert lines[-1].startswith("moved ")


def test_nbd_move_plain_lines_through_a_pipe(served: Served, tmp_path: Path) -> None:
    done = subprocess.run(_move_command(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "\x1b" not in done.stdout and "━" not in done.stdout
    progress = [line for line in lines if line.startswith("nbd move: ")]
    assert progress and progress[-1].startswith("nbd move: done  16.0/16.0 MiB  "), lines
    assert all(_SIZES.search(line) and _ETA.search(line) and "elapsed" in line for line in progress), lines
    assert lines[-1].startswith("moved ")
