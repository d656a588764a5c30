"""What a migration measured of its link: the stream's bandwidth from its report, the round trip by
TCP connects (to a real listener on loopback, and to a port nobody listens on)."""

from __future__ import annotations

import asyncio
import socket

from hikkoshi.agent.link_measure import connect_rtt_ms, stream_bandwidth


def test_stream_bandwidth_from_the_report() -> None:
    info = {"ram": {"mbps": 800.0, "transferred": 64 << 20}, "total-time": 1500, "setup-time": 20}
    assert stream_bandwidth({"migrate_info": info}) == 100e6
    assert stream_bandwidth({}) is None
    assert stream_bandwidth({"migrate_info": {**info, "total-time": 30}}) is None  # too short to tell
    small = {**info, "ram": {"mbps": 800.0, "transferred": 1 << 20}}
    assert stream_bandwidth({"migrate_info": small}) is None  # too little
    assert stream_bandwidth({"migrate_info": {**info, "ram": {"mbps": 0, "transferred": 64 << 20}}}) is None
    assert stream_bandwidth({"migrate_info": {**info, "ram": {"mbps": "fast"}}}) is None


def test_connect_rtt_to_a_listener_and_to_nothing() -> None:
    async def main() -> tuple[float | None, float | None]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            up = await connect_rtt_ms(f"https://127.0.0.1:{port}")
        with socket.socket() as s:  # a port that was free a moment ago: nobody listens
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        down = await connect_rtt_ms(f"http://127.0.0.1:{free}", limit=1.0)
        return up, down

    up, down = asyncio.run(main())
    assert up is not None and 0 <= up < 1000
    assert down is None
