"""The ``hikkoshi`` command against a cluster (``--etcd URL --token-file F``), as scripts run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hikkoshi.cluster.etcd_supervisor import ProcessId

_OWN_ENV = ("HIKKOSHI_ETCD", "HIKKOSHI_AGENT", "HIKKOSHI_TOKEN_FILE", "HIKKOSHI_CA_FILE")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without hikkoshi's own variables (a test says what it means)."""
    env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV and not k.startswith("HIKKOSHI_ETCD")}
    return {**env, **extra}


def hikkoshi_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hikkoshi", *args]


@dataclass
class ClusterCli:
    """``hikkoshi --etcd URL --token-file F ...``."""

    etcd: str
    token_file: Path | None = None

    def argv(self, *args: str) -> list[str]:
        token = ["--token-file", str(self.token_file)] if self.token_file else []
        return hikkoshi_cmd("--etcd", self.etcd, *token, *args)

    def run(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Its exit status, stdout and stderr (no check)."""
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False, env=clean_env()
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        """The command in the background (the caller waits for it)."""
        return subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
        )

    def ok(self, *args: str, timeout: float = 300.0) -> str:
        """Its stdout; it must succeed."""
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, (
            f"{args}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done.stdout

    def json(self, *args: str, timeout: float = 300.0) -> Any:
        """Its stdout as JSON (``--json`` is added)."""
        return json.loads(self.ok(*args, "--json", timeout=timeout))


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
    """Call ``check`` until it returns something true; that value (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def process_gone(pid: int) -> bool:
    """No such process any more (a zombie counts as gone)."""
    return ProcessId.of(pid) is None


@dataclass(frozen=True)
class Result:
    """What a command run in this process returned and printed."""

    code: int
    out: str
    err: str


def in_process(capsys: Any, *args: str) -> Result:
    """``hikkoshi ARGS`` run by :func:`hikkoshi.cli.main.main` in this process (no interpreter to start:
    quick), its output read from pytest's ``capsys``."""
    from hikkoshi.cli.main import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's errors
        code = e.code if isinstance(e.code, int) else 2
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
