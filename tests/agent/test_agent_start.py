"""What an agent refuses to start with, each with a clear reason and nothing served: a token file or a
key others may read, a certificate not of its CA or of another host, plain streams beyond loopback, a
wildcard migration address, and a state directory another agent uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hikkoshi.identity.authority import issue_host, make_ca
from tests.support.agents import AgentProc, identify


def _agent(tmp: Path, name: str = "solo", *extra: str) -> AgentProc:
    return identify(
        AgentProc(name, tmp / name, tmp / "token", {"main": tmp / name / "ds"}, extra=list(extra)), tmp
    )


def _refused(agent: AgentProc, *, state_dir: Path | None = None) -> str:
    """Run the agent; it must exit 2 at once; its message."""
    cmd = [sys.executable, "-m", "hikkoshi", "agent", "--name", agent.name, "--listen", "127.0.0.1:0"]
    cmd += [
        "--datastore",
        f"main={agent.datastores['main']}",
        "--state-dir",
        str(state_dir or agent.state_dir),
    ]
    cmd += ["--token-file", str(agent.token_file), *agent.identity, *agent.extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "listening on" not in done.stdout
    return done.stderr


def test_secrets_open_to_others_are_refused(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.token_file.write_text("a-token-others-can-read\n")
    agent.token_file.chmod(0o644)
    said = _refused(agent)
    assert f"token file {agent.token_file} is open to others (mode 0644)" in said and "chmod 600" in said
    agent.token_file.chmod(0o600)
    key = Path(agent.identity[agent.identity.index("--key") + 1])
    key.chmod(0o640)
    said = _refused(agent)
    assert f"the host key {key} is open to others (mode 0640)" in said
    key.chmod(0o600)


def test_identities_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    # A certificate of another host: --name must be the one its certificate names.
    other = AgentProc(
        "other", tmp_path / "other", agent.token_file, agent.datastores, identity=list(agent.identity)
    )
    assert "but" in _refused(other) and "is the certificate of 'solo'" in _refused(other)
    # A certificate of another CA, with this cluster's CA.
    make_ca(tmp_path / "rogue-ca")
    issue_host(tmp_path / "rogue-ca", "solo", tmp_path / "rogue", ["127.0.0.1"])
    rogue = list(agent.identity)
    rogue[rogue.index("--cert") + 1] = str(tmp_path / "rogue" / "host-cert.pem")
    rogue[rogue.index("--key") + 1] = str(tmp_path / "rogue" / "host-key.pem")
    said = _refused(AgentProc("solo", agent.root, agent.token_file, agent.datastores, identity=rogue))
    assert "was not issued by the CA" in said


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--listen", "0.0.0.0:0", "--migration-address", "127.0.0.1", "--insecure-loopback"],
            "refused unless the API and migration addresses are loopback",
        ),
        (["--listen", "0.0.0.0:0"], "the migration address '0.0.0.0' is every address of the host"),
        (["--migration-address", "192.0.2.1", "--insecure-loopback"], "they are 127.0.0.1 and 192.0.2.1"),
        (["--migration-address", "0.0.0.0"], "is every address of the host"),
        (["--migration-address", "::"], "is every address of the host"),
    ],
)
def test_addresses_that_expose_too_much_are_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    assert message in _refused(_agent(tmp_path, "solo", *extra))


def test_one_agent_per_state_directory(tmp_path: Path) -> None:
    first = _agent(tmp_path)
    first.start()
    try:
        second = _agent(tmp_path, "solo")
        second.datastores = {"main": tmp_path / "second-ds"}
        said = _refused(second, state_dir=first.state_dir)
        assert f"another agent (pid {first.proc.pid if first.proc else 0}) uses the state directory" in said
        assert first.json("vm", "list", "--json") == []  # the first one serves on, untouched
    finally:
        first.stop()
        shutil.rmtree(first.state_dir, ignore_errors=True)
    assert oct(os.stat(tmp_path / "token").st_mode & 0o777) == "0o600"
