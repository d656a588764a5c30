"""Workload parameters on the command line: ``KEY=VALUE`` items (``--param``, ``guest cmdline``)."""

from __future__ import annotations


def parse_params(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        params[key] = value
    return params
