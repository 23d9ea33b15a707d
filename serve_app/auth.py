"""Optional API keys: when configured, every POST (a generation) needs `Authorization: Key <key>`.

Checked in ASGI middleware, before FastAPI reads the body, so an unauthenticated caller gets 401
whatever it sent. GETs (health, docs) stay open for load balancers and browsers.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.config import AppConfig


class ApiKeys:
    """The accepted keys, read from the environment variable the config names (comma-separated)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    @classmethod
    def from_config(cls, config: AppConfig) -> ApiKeys:
        return cls([key.strip() for key in os.environ.get(config.api_keys_env, "").split(",")])

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
    """ASGI middleware; `keys` is called per request because the keys belong to the replica's config."""

    def __init__(self, app: ASGIApp, keys: Callable[[], ApiKeys]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            keys = self.keys()
            if keys.enabled and not keys.accepts(Headers(scope=scope).get("authorization")):
                response = JSONResponse(
                    {
                        "detail": "missing or invalid API key: send `Authorization: Key <key>`",
                        "error_type": "unauthorized",
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Key"},
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
