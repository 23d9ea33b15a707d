"""The ingress's pure-ASGI middlewares (no `BaseHTTPMiddleware`: nothing buffers or re-wraps a stream).

Each takes its settings at construction; `serve_app.http.app.build_http_app` wires them from the
config and the route table in one place. Rejections are catalog errors rendered by `error_response`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable

from ray.serve import context as serve_context
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.contract.errors import TooManyRequests, Unauthorized
from serve_app.contract.queue import ANONYMOUS_OWNER
from serve_app.http.edge import is_valid_request_id
from serve_app.http.errors import error_response
from serve_app.http.routes import RouteTable

VIA_STATUS_PORT = "sdxl.via_status_port"  # scope key: the request came to the status port, not through Serve
CLIENT_SCOPE_KEY = "sdxl.client"  # scope key: who `ClientConcurrencyLimit` counted the request against


class FalRequestId:
    """Return the request's id as `x-fal-request-id` (what fal clients read) next to Serve's `x-request-id`.

    Serve takes the id from the client's `x-request-id` or makes one, and logs it in every deployment
    the request reaches; it has no public getter, hence the private context call. An id that is not
    safe to echo is not (Serve's proxy with `serve_app.edge`'s filter never lets one through). A request
    that did not come through Serve (the status port) echoes the client's id, or one made here, as both.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        echo_as_serve = bool(scope.get(VIA_STATUS_PORT))
        if echo_as_serve:
            given = Headers(scope=scope).get("x-request-id", "")
            request_id = given if is_valid_request_id(given) else uuid.uuid4().hex
        else:
            request_id = serve_context._get_serve_request_context().request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and request_id and is_valid_request_id(request_id):
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-fal-request-id", request_id)  # a queue route sets its job's id
                if echo_as_serve:
                    headers.setdefault("x-request-id", request_id)
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
        candidate = presented_key(authorization)
        return candidate is not None and any(hmac.compare_digest(candidate, known) for known in self._keys)


def request_owner(keys: ApiKeys, headers: Headers) -> str:
    """Whose jobs a request may see and cancel: a hash of its API key (`RequireApiKey` has checked it);
    with keys off, one owner for all."""
    if not keys.enabled:
        return ANONYMOUS_OWNER
    key = presented_key(headers.get("authorization")) or b""
    return "key:" + hashlib.sha256(key).hexdigest()[:32]


def presented_key(authorization: str | None) -> bytes | None:
    """The key in `Authorization: Key <key>` or `Bearer <key>`, `None` for any other scheme."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip().encode() if scheme.lower() in ("key", "bearer") else None


class RequireApiKey:
    """When keys are configured, the endpoints the route table marks need `Authorization: Key <key>`:
    generations, every queue call. Checked before FastAPI reads the body, so an unauthenticated caller
    gets 401 whatever it sent. Health, docs, the playground and result images (by their unguessable
    URLs) stay open."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, routes: RouteTable) -> None:
        self.app = app
        self.keys = keys
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = (
            scope["type"] == "http" and self.keys.enabled and self.routes.needs_key(scope["method"], route_path(scope))
        )
        if guarded and not self.keys.accepts(Headers(scope=scope).get("authorization")):
            return await error_response(Unauthorized())(scope, receive, send)
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Starlette keeps `root_path` in `path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


PAGE_SCRIPT = re.compile(rb"<script(?P<attributes>[^>]*)>(?P<code>.*?)</script>", re.DOTALL | re.IGNORECASE)
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}
NON_PAGE_POLICY = "default-src 'none'; frame-ancestors 'none'"


def page_policy(page: bytes) -> str:
    """A Content-Security-Policy for one HTML page: its own inline scripts (by hash) and same-origin files
    only; styles may be inline; images may be data URIs (previews are)."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(match["code"]).digest()).decode() + "'"
        for match in PAGE_SCRIPT.finditer(page)
        if b"src=" not in match["attributes"].lower()
    ]
    return (
        f"default-src 'none'; script-src 'self' {' '.join(hashes)}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


class SecurityHeaders:
    """Every response: `nosniff`, never framed, no referrer. An HTML page (the playground holds an API key
    field; the docs) also gets a `page_policy`: no third-party or injected script runs in it.
    A page is held until its last byte to hash its scripts; pages are a few KiB, every other response
    passes through as it is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: Message | None = None
        page = bytearray()

        async def secure_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if headers.get("content-type", "").startswith("text/html"):
                    held = message
                    return
                headers.setdefault("content-security-policy", NON_PAGE_POLICY)
            elif held is not None and message["type"] == "http.response.body":
                page.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                MutableHeaders(scope=held).setdefault("content-security-policy", page_policy(bytes(page)))
                await send(held)
                message = {**message, "body": bytes(page)}
            await send(message)

        await self.app(scope, receive, secure_send)


class ClientLedger:
    """Generations in flight per client on this ingress replica: requests being answered (streams, runs,
    submits) and queue jobs from their submit until they complete (`job_in_flight`, from the replica's
    job mirror). `ClientConcurrencyLimit` counts requests; the queue API adds the jobs it admits."""

    SWEEP_EVERY = 256  # recorded jobs between sweeps of every client's finished jobs

    def __init__(self, job_in_flight: Callable[[str], bool]) -> None:
        self.job_in_flight = job_in_flight
        self._requests: Counter[str] = Counter()
        self._jobs: dict[str, set[str]] = {}
        self._recorded = 0

    def in_flight(self, client: str) -> int:
        jobs = self._jobs.get(client)
        if jobs:
            jobs.difference_update([job for job in jobs if not self.job_in_flight(job)])
            if not jobs:
                del self._jobs[client]
        return self._requests[client] + len(self._jobs.get(client, ()))

    def request_started(self, client: str) -> None:
        self._requests[client] += 1

    def request_ended(self, client: str) -> None:
        self._requests[client] -= 1
        if self._requests[client] <= 0:
            del self._requests[client]

    def add_job(self, client: str, request_id: str) -> None:
        self._jobs.setdefault(client, set()).add(request_id)
        self._recorded += 1
        if self._recorded % self.SWEEP_EVERY == 0:
            for known in list(self._jobs):
                self.in_flight(known)


def client_identity(scope: Scope, keys: ApiKeys, address_header: str | None) -> str:
    """Who a request counts against: its API key (hashed) when keys are configured, else its address: the
    connection's, or `address_header` when a trusted front proxy sets it."""
    headers = Headers(scope=scope)
    if keys.enabled:
        return request_owner(keys, headers)
    forwarded = headers.get(address_header) if address_header else None
    if forwarded:
        return "address:" + forwarded.split(",")[-1].strip()
    return "address:" + (scope["client"][0] if scope.get("client") else "unknown")


class ClientPollLimit:
    """At most `per_s` status polls a second per client (a token bucket holding two seconds' worth), on
    whichever port they come: beyond, 429 `too_many_requests` with `Retry-After`. The endpoints are those
    the route table marks as polls (status, its stream, result); `fal_client` polls a job ten times a
    second, so the rate bounds how many jobs one client watches at full speed, not whether it may."""

    IDLE_S = 60.0  # a client quiet this long is forgotten (its bucket would be full again anyway)

    def __init__(
        self, app: ASGIApp, per_s: float, routes: RouteTable, keys: ApiKeys, address_header: str | None = None
    ) -> None:
        self.app = app
        self.per_s = per_s
        self.burst = max(10.0, 2 * per_s)
        self.routes = routes
        self.keys = keys
        self.address_header = address_header
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, monotonic time)
        self._swept_at = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.routes.is_poll(scope["method"], route_path(scope)):
            return await self.app(scope, receive, send)
        client = client_identity(scope, self.keys, self.address_header)
        now = time.monotonic()
        tokens, then = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_s)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            error = TooManyRequests(f"more than {self.per_s:g} status polls a second from this client", retry_after_s=1)
            return await error_response(error)(scope, receive, send)
        self._buckets[client] = (tokens - 1, now)
        if now - self._swept_at > self.IDLE_S:
            self._swept_at = now
            self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < self.IDLE_S}
        await self.app(scope, receive, send)


class ClientConcurrencyLimit:
    """At most `limit` generations in flight per client on this ingress replica (`ClientLedger`): the
    endpoints the route table marks as generations, while they run, and the queue jobs they submitted
    until those complete. Over it: 429 `too_many_requests` with `Retry-After`, before the body is read.

    The client is its API key when keys are configured (`RequireApiKey` has checked it), else its
    address: the connection's, or `address_header` when a trusted front proxy sets it. It is left in
    the scope (`CLIENT_SCOPE_KEY`) for the queue API to record a submitted job against.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        routes: RouteTable,
        ledger: ClientLedger,
        keys: ApiKeys,
        address_header: str | None = None,
        retry_after_s: float = 5.0,
    ) -> None:
        self.app = app
        self.limit = limit
        self.routes = routes
        self.ledger = ledger
        self.keys = keys
        self.address_header = address_header
        self.retry_after_s = retry_after_s

    def client(self, scope: Scope) -> str:
        return client_identity(scope, self.keys, self.address_header)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.routes.counts_as_generation(scope["method"], route_path(scope)):
            return await self.app(scope, receive, send)
        client = self.client(scope)
        if self.ledger.in_flight(client) >= self.limit:
            error = TooManyRequests(
                f"this client already has {self.limit} generations in flight", retry_after_s=self.retry_after_s
            )
            return await error_response(error)(scope, receive, send)
        scope[CLIENT_SCOPE_KEY] = client
        self.ledger.request_started(client)
        try:
            await self.app(scope, receive, send)
        finally:
            self.ledger.request_ended(client)
