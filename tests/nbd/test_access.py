"""A migration's export as an attacker meets it: ``nbd serve --tls-dir HOST --tls-peer PEER
--read-only`` (the way a cold migration serves a VM's disks to its destination). Only the named peer,
with its certificate of the cluster CA, reads; a client without a certificate, with another CA's, with
another host's of the same cluster, or without TLS at all is refused; nobody writes. Real clients
(libnbd's nbdinfo, qemu-io) and our own, with the image checked unchanged after every attack."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.identity.tls_dir import TlsDir
from hikkoshi.nbd.access import Access, ReadOnlyCatalogue, read_only_info
from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.constants import TransmissionFlag
from hikkoshi.nbd.errors import CommandError
from hikkoshi.nbd.export_info import ExportInfo
from tests.support.cluster_pki import Cluster
from tests.support.cluster_pki import cluster as cluster
from tests.support.images import make_image
from tests.support.servers import Served, hikkoshi_server
from tests.support.servers import run_tool as run

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-io", "nbdinfo")), reason="needs qemu-utils and libnbd-bin"
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.raw", 8 * MiB)


@pytest.fixture
def export(image: Path, cluster: Cluster) -> Iterator[Served]:
    """host-a serves ``disk`` to host-b only, read-only."""
    args = ["--export", "disk", "--tls-dir", str(cluster["host-a"].qemu.path), "--tls-peer", "host-b"]
    with hikkoshi_server(str(image), *args, "--read-only") as served:
        yield served


def _uri(served: Served, certs: Path, *extra: str) -> str:
    return f"nbds://127.0.0.1:{served.port}/disk?tls-certificates={certs}" + "".join(f"&{e}" for e in extra)


def _anonymous(root: Path, cluster: Cluster) -> Path:
    """A client directory with the cluster CA only (it checks the server, shows no certificate)."""
    d = root / "anonymous"
    d.mkdir(exist_ok=True)
    shutil.copy(cluster["host-a"].creds.ca, d / "ca-cert.pem")
    return d


def _unverifying(tls: TlsDir) -> ssl.SSLContext:
    """An attacker's client: shows ``tls``'s certificate and trusts any server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


async def _read_with(served: Served, ctx: ssl.SSLContext | None, **uri: str) -> bytes:
    scheme = "nbds" if ctx is not None else "nbd"
    query = "&".join(f"{k.replace('_', '-')}={v}" for k, v in uri.items())
    target = f"{scheme}://127.0.0.1:{served.port}/disk" + (f"?{query}" if query else "")
    async with NbdClient(target, tls=ctx, connect_timeout=10) as client:
        return await client.read(0, 4096)


async def _write_with(served: Served, ctx: ssl.SSLContext) -> None:
    target = f"nbds://127.0.0.1:{served.port}/disk?tls-hostname=host-a"
    async with NbdClient(target, tls=ctx, connect_timeout=10) as client:
        await client.write(0, b"A" * 4096)
        await client.flush()


def test_the_peer_reads_and_cannot_write(export: Served, image: Path, cluster: Cluster) -> None:
    before = _digest(image)
    peer = cluster["host-b"].qemu.path
    info = run("nbdinfo", "--json", _uri(export, peer))
    assert '"is_read_only": true' in info.stdout
    data = asyncio.run(_read_with(export, cluster["host-b"].qemu.client_context(), tls_hostname="host-a"))
    assert data == image.read_bytes()[:4096]
    creds = f"tls-creds-x509,id=tls0,dir={peer},endpoint=client"
    opts = f"driver=nbd,host=127.0.0.1,port={export.port},export=disk,tls-creds=tls0"
    wrote = run("qemu-io", "--object", creds, "--image-opts", opts, "-c", "write -P 0x41 0 64k", check=False)
    assert wrote.returncode != 0 and "permission denied" in wrote.stderr.lower()
    # A client that ignores the read-only flag: the server refuses the write itself.
    with pytest.raises(CommandError, match="EPERM"):
        asyncio.run(_write_with(export, cluster["host-b"].qemu.client_context()))
    assert _digest(image) == before


@pytest.mark.parametrize("who", ["no-tls", "anonymous", "rogue-ca", "other-host"])
def test_attackers_are_refused(
    export: Served, image: Path, cluster: Cluster, tmp_path: Path, who: str
) -> None:
    before = _digest(image)
    if who == "no-tls":
        refused = run("nbdinfo", f"nbd://127.0.0.1:{export.port}/disk", check=False)
        assert refused.returncode != 0  # NBD_REP_ERR_TLS_REQD: nothing before TLS
        with pytest.raises(Exception):  # noqa: B017 - whatever the client says, it gets nothing
            asyncio.run(_read_with(export, None))
    elif who == "anonymous":
        refused = run("nbdinfo", _uri(export, _anonymous(tmp_path, cluster)), check=False)
        assert refused.returncode != 0
    else:
        attacker = cluster.rogue if who == "rogue-ca" else cluster["mallory"]
        # A client that does not even check the server: the refusal is the server's.
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            asyncio.run(_read_with(export, _unverifying(attacker.qemu)))
        refused = run("nbdinfo", _uri(export, attacker.qemu.path, "tls-verify=false"), check=False)
        assert refused.returncode != 0
    # The export still serves its peer, and the image did not change.
    assert asyncio.run(_read_with(export, cluster["host-b"].qemu.client_context(), tls_hostname="host-a"))
    assert _digest(image) == before


def test_the_client_checks_the_name_it_expects(export: Served, cluster: Cluster) -> None:
    """A destination that expects host-c there refuses host-a's certificate (both of the cluster)."""
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_read_with(export, cluster["host-b"].qemu.client_context(), tls_hostname="host-c"))


def test_access_rules() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        Access(peers=frozenset({"host-b"}))
    assert Access().admits(None)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    only_b = Access(tls=tls, peers=frozenset({"host-b"}))
    cert = {"subject": ((("commonName", "host-b"),),), "subjectAltName": (("DNS", "host-b"),)}
    assert only_b.admits(cert)
    assert not only_b.admits({**cert, "subject": ((("commonName", "host-c"),),)})
    assert not only_b.admits({"subject": ((("commonName", "host-b"),),), "subjectAltName": ()})
    assert not only_b.admits(None) and not only_b.admits({})
    rw = ExportInfo("disk", 1 << 20, int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_TRIM))
    ro = read_only_info(rw)
    assert ro.flags & TransmissionFlag.READ_ONLY and not ro.flags & TransmissionFlag.SEND_TRIM

    class One:
        def lookup(self, name: str) -> ExportInfo | None:
            return rw if name == "disk" else None

        def exports(self) -> list[ExportInfo]:
            return [rw]

    view = ReadOnlyCatalogue(One())
    assert view.lookup("disk") == ro and view.lookup("x") is None and list(view.exports()) == [ro]
