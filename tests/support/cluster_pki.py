"""A cluster's identities for tests, made the way ``hikkoshi cluster init`` and ``cluster issue`` make
them: a CA, host certificates (for 127.0.0.1) with their QEMU directories, and a rogue CA's
certificate for a host of the same name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from hikkoshi.identity.authority import issue_host, make_ca
from hikkoshi.identity.credentials import HostCredentials
from hikkoshi.identity.tls_dir import TlsDir


@dataclass(frozen=True)
class Host:
    """One host's files."""

    name: str
    creds: HostCredentials
    qemu: TlsDir

    @property
    def args(self) -> list[str]:
        """An agent's ``--cert/--key/--ca``."""
        return ["--cert", str(self.creds.cert), "--key", str(self.creds.key), "--ca", str(self.creds.ca)]


@dataclass(frozen=True)
class Cluster:
    """A CA and hosts it issued, and a rogue one."""

    root: Path
    ca_dir: Path
    hosts: dict[str, Host]
    rogue: Host
    """A host named ``host-b`` by another CA."""

    def issue(self, name: str) -> Host:
        """One more host of this cluster."""
        return _host(self.ca_dir, self.root / name, name)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


def _host(ca_dir: Path, out: Path, name: str) -> Host:
    issued = issue_host(ca_dir, name, out, ["127.0.0.1"])
    creds = HostCredentials.load(issued.cert, issued.key, issued.ca)
    return Host(name, creds, creds.qemu_dir(out / "qemu"))


def make_cluster(root: Path, *names: str) -> Cluster:
    """A cluster CA in ``root/ca`` and a certificate for each host name."""
    make_ca(root / "ca")
    make_ca(root / "rogue-ca", "some other CA")
    hosts = {n: _host(root / "ca", root / n, n) for n in names}
    return Cluster(root, root / "ca", hosts, _host(root / "rogue-ca", root / "rogue", "host-b"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """host-a, host-b and mallory (all of the cluster), and a rogue host-b."""
    return make_cluster(tmp_path_factory.mktemp("cluster"), "host-a", "host-b", "mallory")
