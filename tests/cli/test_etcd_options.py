"""Where a command finds etcd: ``--etcd`` before the command or (for the agent) after it, the
environment, TLS files, and which way a command goes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hikkoshi.cli.etcd_options import cluster_wanted, etcd_config, etcd_urls
from hikkoshi.cli.main import build_parser

AGENT = ["agent", "--datastore", "main=/x", "--state-dir", "/s", "--token-file", "/t"]


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HIKKOSHI_ETCD",
        "HIKKOSHI_AGENT",
        "HIKKOSHI_ETCD_CA",
        "HIKKOSHI_ETCD_CERT",
        "HIKKOSHI_ETCD_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(list(argv)).parse_args(list(argv))


def test_the_agent_takes_etcd_before_or_after_its_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = parse("--etcd", "http://e1:2379", *AGENT)
    assert etcd_urls(args) == "http://e1:2379"
    args = parse(*AGENT, "--etcd", "http://e2:2379")
    assert etcd_urls(args) == "http://e2:2379"
    assert etcd_urls(parse(*AGENT)) is None
    monkeypatch.setenv("HIKKOSHI_ETCD", "http://e3:2379")
    assert etcd_urls(parse(*AGENT)) == "http://e3:2379"
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    args = parse(*AGENT, "--etcd-ca", str(ca))
    config = etcd_config(args)
    assert config.endpoints == ("e3:2379",) and config.tls is not None and config.tls.ca_file == ca


def test_which_way_a_command_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not cluster_wanted(parse("vm", "list"))
    assert cluster_wanted(parse("--etcd", "e:1", "vm", "list"))
    with pytest.raises(ValueError, match="give one"):
        cluster_wanted(parse("--etcd", "e:1", "--agent", "http://a", "vm", "list"))
    monkeypatch.setenv("HIKKOSHI_ETCD", "e:1")
    assert cluster_wanted(parse("vm", "list"))
    assert not cluster_wanted(parse("--agent", "http://a", "vm", "list"))


def test_bad_etcd_options() -> None:
    with pytest.raises(ValueError, match="which etcd"):
        etcd_config(parse("vm", "list"))
    with pytest.raises(ValueError, match="needs --etcd-ca"):
        etcd_config(parse("--etcd", "https://e:1", "vm", "list"))
    with pytest.raises(ValueError, match="need --etcd-ca"):
        etcd_config(parse("--etcd", "e:1", "--etcd-cert", "/c", "vm", "list"))
    with pytest.raises(ValueError, match="no such file"):
        etcd_config(parse("--etcd", "e:1", "--etcd-ca", "/nonexistent/ca", "vm", "list"))
