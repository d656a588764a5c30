"""Carrying out a lab's ``ip`` commands (:mod:`hikkoshi.lab.netns_lab` makes them)."""

from __future__ import annotations

import subprocess

from hikkoshi.lab.netns_lab import LabError


def run_ip(cmds: list[list[str]], *, check: bool = True) -> list[str]:
    """Run the commands in order; the errors of those that failed (``check``: raise at the first)."""
    errors = []
    for cmd in cmds:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except OSError as exc:
            raise LabError(f"{cmd[0]}: {exc.strerror}") from None
        if done.returncode != 0:
            error = f"{' '.join(cmd)}: {done.stderr.strip()}"
            if check:
                raise LabError(error)
            errors.append(error)
    return errors
