"""Serving the dashboard on exactly the address it was given (port 0: a free one) until SIGTERM or
SIGINT; open event streams are closed within seconds then."""

from __future__ import annotations

import uvicorn

from hikkoshi.agent.server import bind
from hikkoshi.web.app import create_app
from hikkoshi.web.context import Dashboard

#: Event streams never end by themselves: at shutdown they are given this long, then closed.
SHUTDOWN_SECONDS = 2


async def serve(dash: Dashboard, host: str, port: int) -> int:
    """Run the dashboard until it is told to stop; the exit status."""
    sock = bind(host, port)
    bound = sock.getsockname()
    app = create_app(dash)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        )
    )
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"hikkoshi dashboard listening on http://{shown}:{bound[1]}", flush=True)
    await server.serve(sockets=[sock])
    return 0 if server.started else 1
