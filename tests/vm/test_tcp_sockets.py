"""A process's TCP connections read from /proc, and one of them cut at the kernel (a real socket pair
on loopback: the cut end's next read fails, the listener is never touched)."""

from __future__ import annotations

import os
import socket

import pytest

from hikkoshi.vm.tcp_sockets import Connection, _address, connections, cut_to, parse_table

TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1
   1: 0100007F:C350 0200A8C0:1F91 01 00000000:00000000 00:00000000 00000000     0        0 222 1
   2: 0100007F:C351 0200A8C0:1F92 01 00000000:00000000 00:00000000 00000000     0        0 333 1
   3: garbage
"""


def test_the_table_and_its_addresses() -> None:
    assert _address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _address("00000000000000000000000001000000:0016") == ("::1", 22)
    assert _address("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)  # IPv4-mapped
    got = parse_table(TABLE, {111, 222})
    assert got == [Connection("127.0.0.1", 50000, "192.168.0.2", 8081)]  # 111 listens, 333 is not ours
    assert got[0].endpoint() == "192.168.0.2:8081"
    assert Connection("::1", 1, "::1", 2).endpoint() == "[::1]:2"


def test_a_connection_cut_at_the_kernel() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        peer, _ = server.accept()
        try:
            mine = [c for c in connections(os.getpid()) if c.remote_port == port]
            assert len(mine) == 1 and mine[0].local_port == client.getsockname()[1]
            assert cut_to(os.getpid(), f"127.0.0.1:{port + 1 if port < 65535 else 1}") == 0
            assert cut_to(os.getpid(), f"127.0.0.1:{port}") == 1
            with pytest.raises(OSError):
                client.sendall(b"x" * 1024)
                client.recv(1)
            assert [c for c in connections(os.getpid()) if c.remote_port == port] == []
            assert server.getsockname()[1] == port  # the listener is still there
        finally:
            client.close()
            peer.close()
