"""etcd with TLS client certificates: a client with a certificate from the CA gets in, others do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from hikkoshi.cluster.config import EtcdConfig, EtcdTls
from hikkoshi.cluster.errors import ClusterError
from hikkoshi.cluster.etcd_process import EtcdMember, MemberSpec, MemberTls, free_ports
from hikkoshi.cluster.store import Store
from tests.support.etcd import gone, run
from tests.support.etcd_certs import Ca


def test_client_certificates(tmp_path: Path) -> None:
    ca = Ca(tmp_path)
    server_crt, server_key = ca.issue("etcd-server", server=True)
    client_crt, client_key = ca.issue("agent-a", server=False)
    probe_crt, probe_key = ca.issue("supervisor", server=False)
    stranger = Ca(tmp_path, "other-ca")
    bad_crt, bad_key = stranger.issue("intruder", server=False)
    tls = MemberTls(server_crt, server_key, ca.file, ca.file, probe_crt, probe_key)
    client, peer = free_ports(2)
    member = EtcdMember(MemberSpec("tls", tmp_path / "data", client, peer, tls=tls))
    member.start()
    pid = member.pid
    try:
        run(member.wait_healthy())
        assert member.spec.client_url.startswith("https://")
        endpoint = member.spec.endpoint

        async def main() -> None:
            good = EtcdConfig((endpoint,), tls=EtcdTls(ca.file, client_crt, client_key))
            async with Store(good) as store:
                await store.put("/tls/k", b"v")
                assert (await store.get("/tls/k")).value == b"v"  # type: ignore[union-attr]
            for wrong in (
                EtcdTls(ca.file),  # no client certificate
                EtcdTls(ca.file, bad_crt, bad_key),  # signed by another CA
                EtcdTls(stranger.file, client_crt, client_key),  # does not trust the server
            ):
                with pytest.raises(ClusterError):
                    async with Store(EtcdConfig((endpoint,), tls=wrong, attempt_timeout=0.5, deadline=1.5)):
                        pass
            plain = EtcdConfig((endpoint,), attempt_timeout=0.5, deadline=1.5)
            with pytest.raises(ClusterError):
                async with Store(plain):
                    pass

        run(main())
    finally:
        member.stop_sync()
        assert pid is not None and gone(pid)
