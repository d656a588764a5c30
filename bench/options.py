"""Command-line option types the benchmark runners share."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence


def name_list(
    text: str, known: Sequence[str], what: str, aliases: Mapping[str, str | Sequence[str]] | None = None
) -> list[str]:
    """``a,b,c`` as a list of known names, in order, each once; an alias stands for one name or several.

    ``argparse.ArgumentTypeError`` for an unknown name or an empty selection."""
    names: list[str] = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        alias = (aliases or {}).get(raw, raw)
        for name in (alias,) if isinstance(alias, str) else alias:
            if name not in known:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; known: {', '.join(known)}")
            if name not in names:
                names.append(name)
    if not names:
        raise argparse.ArgumentTypeError(f"no {what} selected")
    return names
