"""The dashboard's templates (Jinja2, package data, autoescaped) and the filters they format figures
with: bytes, rates, seconds, times of day."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def size(n: Any) -> str:
    """``1.5 GiB``; ``-`` when unknown."""
    if not isinstance(n, int | float):
        return "-"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def seconds(s: Any) -> str:
    """``3.2 s``, ``2 min 5 s``; ``-`` when unknown."""
    if not isinstance(s, int | float):
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def clock(t: Any) -> str:
    """A wall-clock time as ``HH:MM:SS`` (the dashboard's local time)."""
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t))


def number(x: Any, digits: int = 1) -> str:
    """A figure with ``digits`` decimals; ``-`` when unknown."""
    if not isinstance(x, int | float):
        return "-"
    return f"{x:.{digits}f}"


def environment() -> Environment:
    """The template environment."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=size, seconds=seconds, clock=clock, number=number)
    return env


ENV = environment()


def render(name: str, **context: Any) -> str:
    """A template rendered with ``context``."""
    return ENV.get_template(name).render(**context)
