"""Small ASGI middlewares for the ingress whose settings come from the replica's config.

The FastAPI app is built at import time, before any config exists, so these look the replica's
settings up per request (`settings()`), from the ingress instance serving it.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.serve import context as serve_context
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import AppConfig


class FalRequestId:
    """Return the request's id as `x-fal-request-id` (what fal clients read) next to Serve's `x-request-id`.

    Serve takes the id from the client's `x-request-id` or makes one, and logs it in every deployment
    the request reaches; it has no public getter, hence the private context call.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = serve_context._get_serve_request_context().request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and request_id:
                MutableHeaders(scope=message)["x-fal-request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class ReplicaCORS:
    """Starlette's CORS middleware, built on first use from the replica's `cors_allow_origins`."""

    def __init__(self, app: ASGIApp, settings: Callable[[], AppConfig]) -> None:
        self.app = app
        self.settings = settings
        self._handler: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan runs before the replica's config is reachable
            return await self.app(scope, receive, send)
        if self._handler is None:
            origins = self.settings().cors_allow_origins
            self._handler = (
                CORSMiddleware(
                    self.app,
                    allow_origins=origins,
                    allow_methods=["GET", "POST", "OPTIONS"],
                    allow_headers=["authorization", "content-type", "accept", "x-request-id"],
                    expose_headers=["x-request-id", "x-fal-request-id", "retry-after"],
                    max_age=600,
                )
                if origins
                else self.app
            )
        await self._handler(scope, receive, send)
