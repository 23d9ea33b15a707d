"""The small requests' own server: each ingress replica answers `GET /health` and queue status polls
on `status_port` under plain uvicorn.

Through Serve's proxy such a request costs ~20x what the same app costs under uvicorn alone: the
proxy's routing and actor call, then the replica's per-request wrapper (benchmarks/results/
request_cost.md). Polls are most of a queue's traffic and need neither (the answer is in this replica's
job mirror), so a front proxy sends them here; everything else keeps Serve's path, with its routing,
backpressure and request logs. The app is the same FastAPI app, middlewares included (keys, Host,
request ids, security headers), behind a filter that refuses any other route.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.contract.errors import NotFound
from serve_app.http.errors import error_response
from serve_app.http.middleware import VIA_STATUS_PORT
from serve_app.http.routes import RouteTable

logger = logging.getLogger("ray.serve")

BIND_RETRY_S = 5.0


class OnlySmallRequests:
    """The endpoints the route table puts on the status port pass (marked as not from Serve); any other
    request is a 404 here (it belongs on Serve's port)."""

    def __init__(self, app: ASGIApp, routes: RouteTable) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.routes.on_status_port(scope["method"], scope["path"]):
            error = NotFound("this port answers only GET /health and queue status polls")
            return await error_response(error)(scope, receive, send)
        scope[VIA_STATUS_PORT] = True
        await self.app(scope, receive, send)


class StatusServer:
    """uvicorn on the replica's event loop. One replica of the app per node holds the port; others on
    the node keep trying to take it (every replica mirrors every job, so any one can answer), and take
    over when it goes. No SO_REUSEPORT: a second app given the same port by mistake must not silently
    share it."""

    def __init__(self, app: ASGIApp, routes: RouteTable, host: str, port: int) -> None:
        self.address = (host, port)
        config = uvicorn.Config(
            OnlySmallRequests(app, routes),
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            # Longer than the front proxy keeps idle upstream connections (nginx: 60 s), like Serve's 75 s:
            # a connection closed here just as nginx reuses it would count as this replica failing.
            timeout_keep_alive=75,
        )
        self._server = uvicorn.Server(config)
        # The replica owns its signals (graceful shutdown); uvicorn would take SIGINT and SIGTERM if this
        # loop were the main thread's.
        self._server.capture_signals = contextlib.nullcontext
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(_log_exit)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None and not self._server.started:
            self._task.cancel()

    async def _run(self) -> None:
        waiting = False
        while True:
            try:
                sock = self._listen()
                break
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                if not waiting:
                    logger.info("Port %d is taken (another replica of this app?): retrying", self.address[1])
                    waiting = True
                await asyncio.sleep(BIND_RETRY_S)
        logger.info("Answering health and status polls on %s:%d", *self.address)
        await self._server.serve(sockets=[sock])

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not a shared port
            sock.bind(self.address)
            # Here, not in uvicorn: with SO_REUSEADDR two replicas can both bind a port nobody listens on
            # yet, and only the second `listen` fails; that must happen inside the retry.
            sock.listen(self._server.config.backlog)
        except OSError:
            sock.close()
            raise
        return sock


def _log_exit(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("The status server stopped", exc_info=task.exception())
