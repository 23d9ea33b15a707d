"""The ingress's pure-ASGI middlewares (no `BaseHTTPMiddleware`: nothing buffers or re-wraps a stream).

Each takes its settings at construction; `serve_app.http_app.build_http_app` wires them from the
config in one place. Rejections are catalog errors rendered by `ServiceError.response`.
"""

from __future__ import annotations

import hmac
import os

from ray.serve import context as serve_context
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import RequestTooLarge, Unauthorized


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
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-fal-request-id", request_id)  # a queue route sets its job's id
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeys:
    """The accepted keys, read from the environment variable the config names (comma-separated)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    @classmethod
    def from_env(cls, variable: str) -> ApiKeys:
        return cls([key.strip() for key in os.environ.get(variable, "").split(",")])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, authorization: str | None) -> bool:
        """`Key <key>` (what fal clients send) or `Bearer <key>`; compared in constant time."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() not in ("key", "bearer"):
            return False
        candidate = key.strip().encode()
        return any(hmac.compare_digest(candidate, known) for known in self._keys)


class RequireApiKey:
    """When keys are configured, every POST (a generation), PUT (a cancel) and queue call needs
    `Authorization: Key <key>`.

    Checked before FastAPI reads the body, so an unauthenticated caller gets 401 whatever it sent.
    Other GETs (health, docs, the playground, result images by their unguessable URLs) stay open.
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = (
            scope["type"] == "http"
            and self.keys.enabled
            and (scope["method"] in ("POST", "PUT") or _route_path(scope).startswith("/queue/"))
        )
        if guarded and not self.keys.accepts(Headers(scope=scope).get("authorization")):
            return await Unauthorized().response()(scope, receive, send)
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Starlette keeps `root_path` in `path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """413 `request_too_large` for a body over `max_bytes`: by its declared length up front, else while
    it streams in. (Starlette's own limit answers in plain text; fal clients read our JSON shape.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if response_started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLarge(f"request body is larger than {self.max_bytes} bytes")
        await error.response()(scope, receive, send)
