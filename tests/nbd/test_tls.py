"""TLS (NBD_OPT_STARTTLS): qemu, libnbd and our own client against our server with X.509 certificates.

A throwaway CA signs a server certificate (for 127.0.0.1 and localhost) and a client certificate; a second,
unrelated CA signs a client certificate that must be refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from hikkoshi.nbd.client import NbdClient, list_exports
from hikkoshi.nbd.constants import OptionReply
from hikkoshi.nbd.errors import OptionError
from hikkoshi.nbd.tls import client_context
from tests.support.images import make_image
from tests.support.pki import Pki, make_ca, pem_cert
from tests.support.pki import pki as pki
from tests.support.servers import Served, hikkoshi_server
from tests.support.servers import run_tool as run

MiB = 1 << 20
SIZE = 64 * MiB

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo")),
    reason="needs qemu-utils and libnbd-bin",
)


def _tls_args(pki: Pki, require_client_cert: bool) -> list[str]:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return args + (["--tls-ca", str(pki.ca)] if require_client_cert else [])


@pytest.fixture
def tls_served(image: Path, pki: Pki) -> Iterator[Served]:
    with hikkoshi_server(str(image), "--export", "disk", *_tls_args(pki, False)) as s:
        yield s


@pytest.fixture
def mtls_served(image: Path, pki: Pki) -> Iterator[Served]:
    """A server that also requires a client certificate signed by the CA."""
    with hikkoshi_server(str(image), "--export", "disk", *_tls_args(pki, True)) as s:
        yield s


# --- helpers ---------------------------------------------------------------------------------------------


def qemu_opts(served: Served, creds_dir: Path) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={served.port},export=disk,tls-creds=tls0",
    ]


def nbds(served: Served, creds_dir: Path, export: str = "disk") -> str:
    return f"nbds://127.0.0.1:{served.port}/{export}?tls-certificates={creds_dir}"


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# --- tests -----------------------------------------------------------------------------------------------


def test_server_announces_nbds(tls_served: Served) -> None:
    assert tls_served.uri == f"nbds://127.0.0.1:{tls_served.port}/"


def test_qemu_img_info_over_tls(tls_served: Served, pki: Pki) -> None:
    proc = run("qemu-img", "info", "--output=json", *qemu_opts(tls_served, pki.anonymous_dir))
    assert json.loads(proc.stdout)["virtual-size"] == SIZE


def test_qemu_io_over_tls(tls_served: Served, pki: Pki, image: Path) -> None:
    proc = run(
        "qemu-io",
        "-c", "write -P 0xe1 3M 128k",
        "-c", "read -P 0xe1 3M 128k",
        "-c", "write -P 0xe2 7 1000",
        "-c", "read -P 0xe2 7 1000",
        *qemu_opts(tls_served, pki.client_dir),
    )  # fmt: skip
    assert "verification failed" not in proc.stdout
    assert file_bytes(image, 3 * MiB, 128 * 1024) == b"\xe1" * 128 * 1024
    assert file_bytes(image, 7, 1000) == b"\xe2" * 1000


def test_qemu_img_compare_over_tls(tls_served: Served, pki: Pki, image: Path) -> None:
    # Everything read through TLS equals the file.
    opts = qemu_opts(tls_served, pki.anonymous_dir)
    run("qemu-img", "compare", *opts[:3], f"driver=file,filename={image}", opts[3])
    # And a difference would be seen: compare against another image fails.
    other = make_image(image.parent / "other.raw", SIZE, seed=2)
    proc = run("qemu-img", "compare", *opts[:3], f"driver=file,filename={other}", opts[3], check=False)
    assert proc.returncode == 1


def test_nbdinfo_over_tls(tls_served: Served, pki: Pki) -> None:
    info = json.loads(run("nbdinfo", "--json", nbds(tls_served, pki.client_dir)).stdout)
    assert info["TLS"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    # The map comes through TLS too.
    extents = json.loads(run("nbdinfo", "--map", "--json", nbds(tls_served, pki.client_dir)).stdout)
    assert extents[0]["offset"] == 0 and extents[0]["length"] == MiB and extents[0]["type"] == 0
    assert extents[1]["offset"] == MiB and extents[1]["type"] == 3


def test_nbdinfo_list_over_tls(image: Path, pki: Pki, tmp_path: Path) -> None:
    other = make_image(tmp_path / "other.raw", 8 * MiB, seed=5)
    with hikkoshi_server(
        str(image), str(other), "--export", "disk", "--export", "other", *_tls_args(pki, False)
    ) as s:
        uri = f"nbds://127.0.0.1:{s.port}/?tls-certificates={pki.client_dir}"
        info = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)
    assert {e["export-name"]: e["export-size"] for e in info["exports"]} == {"disk": SIZE, "other": 8 * MiB}


def plain(served: Served, export: str = "disk") -> str:
    return f"nbd://127.0.0.1:{served.port}/{export}"


def test_plaintext_client_is_refused_and_tls_goes_on(tls_served: Served, pki: Pki) -> None:
    proc = run("nbdinfo", "--json", plain(tls_served), check=False)
    assert proc.returncode != 0
    assert "export-size" not in proc.stdout
    # libnbd reports NBD_REP_ERR_TLS_REQD as ENOTSUP; qemu names it.
    assert "Operation not supported" in proc.stderr or "TLS" in proc.stderr, proc.stderr
    proc = run("qemu-img", "info", plain(tls_served), check=False)
    assert proc.returncode != 0
    assert "TLS negotiation required" in proc.stderr, proc.stderr
    # Listing exports without TLS is refused as well.
    proc = run("nbdinfo", "--list", plain(tls_served, ""), check=False)
    assert proc.returncode != 0
    assert "disk" not in proc.stdout
    # The server keeps serving TLS clients.
    assert run("nbdinfo", "--size", nbds(tls_served, pki.client_dir)).stdout.strip() == str(SIZE)
    run("qemu-img", "info", *qemu_opts(tls_served, pki.anonymous_dir))


def test_client_with_wrong_ca_refuses_server(tls_served: Served, pki: Pki, tmp_path: Path) -> None:
    # The client trusts only another CA: it must not talk to our server.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "ca-cert.pem").write_bytes(pem_cert(make_ca("unrelated CA")[0]))
    proc = run("nbdinfo", "--size", nbds(tls_served, wrong), check=False)
    assert proc.returncode != 0
    run("nbdinfo", "--size", nbds(tls_served, pki.client_dir))


def test_client_certificate_accepted(mtls_served: Served, pki: Pki, image: Path) -> None:
    assert run("nbdinfo", "--size", nbds(mtls_served, pki.client_dir)).stdout.strip() == str(SIZE)
    run(
        "qemu-io",
        "-c",
        "write -P 0x42 9M 4k",
        "-c",
        "read -P 0x42 9M 4k",
        *qemu_opts(mtls_served, pki.client_dir),
    )
    assert file_bytes(image, 9 * MiB, 4096) == b"\x42" * 4096


def test_client_without_certificate_refused(mtls_served: Served, pki: Pki) -> None:
    proc = run("nbdinfo", "--size", nbds(mtls_served, pki.anonymous_dir), check=False)
    assert proc.returncode != 0
    assert proc.stdout.strip() != str(SIZE)
    proc = run("qemu-img", "info", *qemu_opts(mtls_served, pki.anonymous_dir), check=False)
    assert proc.returncode != 0
    # A certificate from another CA is refused too.
    proc = run("nbdinfo", "--size", nbds(mtls_served, pki.rogue_dir), check=False)
    assert proc.returncode != 0
    # And a good client still gets through afterwards.
    assert run("nbdinfo", "--size", nbds(mtls_served, pki.client_dir)).stdout.strip() == str(SIZE)


# --- our own client ----------------------------------------------------------------------------------------


def test_our_client_over_tls(tls_served: Served, pki: Pki, image: Path) -> None:
    ctx = client_context(ca=pki.client_dir / "ca-cert.pem")
    expected = file_bytes(image, 4 * MiB, 4096)

    async def go() -> None:
        async with NbdClient(f"nbds://127.0.0.1:{tls_served.port}/disk", tls=ctx) as c:
            assert c.size == SIZE
            assert await c.read(4 * MiB, 4096) == expected
            await c.write(6 * MiB + 3, b"tls!" * 1000)
            await c.flush()
            assert await c.read(6 * MiB + 3, 4000) == b"tls!" * 1000
            extents = await c.block_status(0, 2 * MiB)
            assert extents[0] == (MiB, 0)
        names = [e.name for e in await list_exports(f"nbds://127.0.0.1:{tls_served.port}/", tls=ctx)]
        assert names == ["disk"]

    asyncio.run(go())
    assert file_bytes(image, 6 * MiB + 3, 4000) == b"tls!" * 1000


def test_our_client_with_certificate(mtls_served: Served, pki: Pki, image: Path) -> None:
    uri = f"nbds://127.0.0.1:{mtls_served.port}/disk"
    good = client_context(ca=pki.client_dir / "ca-cert.pem", cert=pki.client_cert, key=pki.client_key)
    anonymous = client_context(ca=pki.client_dir / "ca-cert.pem")

    async def go() -> None:
        async with NbdClient(uri, tls=good) as c:
            await c.write(10 * MiB, b"\x99" * 65536, fua=True)
            assert await c.read(10 * MiB, 65536) == b"\x99" * 65536
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            async with NbdClient(uri, tls=anonymous, connect_timeout=20) as c:
                await c.read(0, 512)  # TLS 1.3: the refusal may arrive only with the first reply

    asyncio.run(go())
    assert file_bytes(image, 10 * MiB, 65536) == b"\x99" * 65536


def test_our_client_rejects_untrusted_server(tls_served: Served, tmp_path: Path) -> None:
    wrong_ca = tmp_path / "wrong-ca.pem"
    wrong_ca.write_bytes(pem_cert(make_ca("unrelated CA")[0]))

    async def go() -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with NbdClient(f"nbds://127.0.0.1:{tls_served.port}/disk", tls=client_context(ca=wrong_ca)):
                pass

    asyncio.run(go())


def test_our_plaintext_client_is_refused(tls_served: Served) -> None:
    async def go() -> None:
        with pytest.raises(OptionError) as err:
            async with NbdClient(plain(tls_served), connect_timeout=20):
                pass
        assert err.value.reply_type == OptionReply.ERR_TLS_REQD

    asyncio.run(go())
