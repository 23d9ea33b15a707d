"""The edge: bounds on what a client can make the service read, hold or believe before any route runs.

Two layers use these pure-ASGI middlewares, in two processes:
- Serve's proxy, through Ray's proxy callback: start Ray with
  `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http.edge:proxy_middlewares`. They then run before
  Serve's proxy reads its own control headers or picks a replica, so a hostile header never reaches
  Serve's logic, a stalled upload never holds an ingress slot, and the proxy buffers at most one
  bounded body per request.
- the ingress app (`serve_app.http.app`), which repeats the size and time bounds and checks `Host`,
  for a proxy started without the callback.
Neither can bound the time to send a request head, idle connections, or the bytes of a huge head
(uvicorn reads them before any ASGI code runs): that is the front proxy's job
(`configs/nginx-front-proxy.conf`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable, Iterable

import anyio
from ray.serve._private.constants import (
    SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,
    SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
    SERVE_MULTIPLEXED_MODEL_ID,
    SERVE_SESSION_ID,
)
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import IMAGE_BODY_CEILING_BYTES, IMAGE_BODY_TIMEOUT_CEILING_S
from serve_app.contract.errors import (
    HeadersTooLarge,
    HostNotAllowed,
    Overloaded,
    RequestTimeout,
    RequestTooLarge,
    ServiceError,
)
from serve_app.host_patterns import host_matches
from serve_app.http.errors import error_response

MAX_BODY_BYTES = 1024 * 1024  # a request is a few KiB of JSON; anything near this is a mistake or abuse
# Routes whose bodies carry images (image to image, inpainting, their queue submits, an upload's PUT), by path
# alone: Serve's proxy knows no app id. The app holds them to `inputs.max_body_bytes` after it.
IMAGE_ROUTE = re.compile(r".*/((image-to-image|inpainting)(/stream)?|storage/upload/[^/]+/[^/]+)")
# Large bodies read at once per process (before any key is checked): each may hold tens of MiB for a
# minute, so a few slow clients must not hold gigabytes. Past this, 503 `overloaded` at once.
LARGE_BODIES_AT_ONCE = 8
MAX_HEAD_BYTES = 32 * 1024  # request line and headers: nginx's default total (4 x 8 KiB buffers)
BODY_TIMEOUT_S = 10.0  # from the request head to the body's last byte

# 1..128 characters that Serve can decode, log and echo, and a log reader can trust; others are replaced.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
REQUEST_ID_HEADER = b"x-request-id"


def _header_key(name: bytes) -> bytes:
    """Serve matches its routing headers case-blind with `-` and `_` alike (nginx rewrites one to the other)."""
    return name.lower().replace(b"-", b"_")


# What Serve's proxy acts on for whoever sends it (ray/serve/_private/proxy.py, http_util.py): a
# timeout of the client's choosing, no cancellation on disconnect, model and session routing.
SERVE_CONTROL_HEADERS = frozenset(
    _header_key(name.encode())
    for name in (
        SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
        SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,
        SERVE_MULTIPLEXED_MODEL_ID,
        SERVE_SESSION_ID,
    )
)
SERVE_ROUTER_HEADER_PREFIX = b"x_serve_router_"  # the ingress request router's trusted headers


def is_valid_request_id(value: str | bytes) -> bool:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return REQUEST_ID_PATTERN.fullmatch(text) is not None


def without_client_controls(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request's headers less Serve's control headers, and less `x-request-id` unless it is one
    valid id (Serve then makes its own)."""
    headers = list(headers)
    ids = [value for name, value in headers if name.lower() == REQUEST_ID_HEADER]
    keep_id = len(ids) == 1 and is_valid_request_id(ids[0])
    kept = []
    for name, value in headers:
        key = _header_key(name)
        if key in SERVE_CONTROL_HEADERS or key.startswith(SERVE_ROUTER_HEADER_PREFIX):
            continue
        if name.lower() == REQUEST_ID_HEADER and not keep_id:
            continue
        kept.append((name, value))
    return kept


def head_size(scope: Scope) -> int:
    """Bytes of the request line and headers, as they came (near enough: separators counted once)."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
    return target + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


async def reject(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with a catalog error and close the connection: what is left of the request is not read."""
    response = error_response(error)
    response.headers["connection"] = "close"
    await response(scope, receive, send)


class ServeHeaderFilter:
    """Drops the headers Serve's proxy would obey from anyone (see `SERVE_CONTROL_HEADERS`), and an
    `x-request-id` that is not one id of 1..128 of `[A-Za-z0-9_.:-]`: Serve then makes its own.
    Only useful in the proxy, in front of Serve's own header handling."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["headers"] = without_client_controls(scope["headers"])
        await self.app(scope, receive, send)


class HeadSizeLimit:
    """431 `headers_too_large` for a request line and headers over `max_bytes` (by then they were read:
    bounding the read itself needs the front proxy)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEAD_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_size(scope) > self.max_bytes:
            error = HeadersTooLarge(f"the request line and headers are over {self.max_bytes} bytes")
            return await reject(error, scope, receive, send)
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class BodyGuard:
    """Reads the whole body before the app runs, then hands it over from memory.

    At most `max_bytes` (413 `request_too_large`: by the declared length before anything is read, so
    `Expect: 100-continue` gets no `100 Continue`; while a chunked body streams in, without parsing it),
    all of it within `timeout_s` of the head (408 `request_timeout`); `limits_for(scope)`, when given,
    chooses both per request instead (image routes take larger bodies). A client that leaves before its
    body is complete gets nothing and starts nothing. With `stop_on_disconnect`, a client leaving later
    cancels the app (the route's cleanup stops its generation) whether or not the proxy in front
    watched for it: a client cannot opt out with `x-request-disconnect-disabled`.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        timeout_s: float = BODY_TIMEOUT_S,
        stop_on_disconnect: bool = False,
        limits_for: Callable[[Scope], tuple[int, float]] | None = None,
        large_bodies: BodySlots | None = None,
    ) -> None:
        self.app = app
        self.limits_for = limits_for or (lambda scope: (max_bytes, timeout_s))
        self.stop_on_disconnect = stop_on_disconnect
        self.large_bodies = large_bodies or LARGE_BODY_SLOTS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if "content-length" not in headers and "transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body
        max_bytes, timeout_s = self.limits_for(scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            return await reject(_too_large(max_bytes), scope, receive, send)
        large = max_bytes > MAX_BODY_BYTES and not (declared.isdigit() and int(declared) <= MAX_BODY_BYTES)
        if large and not self.large_bodies.take():
            error = Overloaded("too many large request bodies are arriving at once; retry shortly", retry_after_s=1)
            return await reject(error, scope, receive, send)
        try:
            with anyio.fail_after(timeout_s):
                body = await self._read(receive, max_bytes)
        except _BodyTooLarge:
            return await reject(_too_large(max_bytes), scope, receive, send)
        except TimeoutError:
            error = RequestTimeout(f"the request body did not arrive within {timeout_s:g} s")
            return await reject(error, scope, receive, send)
        except _ClientGone:
            return None
        finally:
            if large:
                self.large_bodies.give()
        await self._run(scope, body, receive, send)

    async def _read(self, receive: Receive, max_bytes: int) -> bytes:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body += message.get("body", b"")
            if len(body) > max_bytes:
                raise _BodyTooLarge
            if not message.get("more_body", False):
                return bytes(body)

    async def _run(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """The app with the body replayed; after it, `receive` answers only the client's disconnect."""
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        gone = anyio.Event()

        async def replay() -> Message:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        with anyio.CancelScope() as app_scope:
            watcher = asyncio.ensure_future(self._watch(receive, gone, app_scope))
            try:
                await self.app(scope, replay, send)
            finally:
                watcher.cancel()

    async def _watch(self, receive: Receive, gone: anyio.Event, app_scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        if self.stop_on_disconnect:
            app_scope.cancel()


class BodySlots:
    """How many large bodies a process reads at once (one event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


LARGE_BODY_SLOTS = BodySlots(LARGE_BODIES_AT_ONCE)


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {max_bytes} bytes")


def proxy_body_limits(scope: Scope) -> tuple[int, float]:
    """The proxy's body bounds: an image route's ceiling, else the 1 MiB every other route keeps."""
    if IMAGE_ROUTE.fullmatch(scope.get("path", "")):
        return IMAGE_BODY_CEILING_BYTES, IMAGE_BODY_TIMEOUT_CEILING_S
    return MAX_BODY_BYTES, BODY_TIMEOUT_S


LOOPBACK_NAMES = ("localhost",)


def _host_name(host: str) -> str:
    """`Host` without its port, lower case, without a trailing dot; IPv6 literals without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    if ":" in name or not (name and port.isdigit()):
        name = host  # no port, or an IPv6 literal without brackets
    return name.rstrip(".")


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def is_loopback_host(name: str) -> bool:
    """localhost, *.localhost (RFC 6761), 127.0.0.0/8 and ::1."""
    return name in LOOPBACK_NAMES or name.endswith(".localhost") or _is_loopback_address(name)


class HostAllowList:
    """Which `Host` names the service answers for (else 400 `host_not_allowed`).

    A request that arrived on a loopback address may always name a loopback host. With `allowed`
    empty it may name nothing else (a web page whose DNS name rebinds to 127.0.0.1 cannot drive a
    service bound there), while requests on other addresses may name any host. With `allowed` set
    (exact names, '.example.com' for its subdomains, '*' for any), every request may also name
    those, and a request on a non-loopback address only those.
    """

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = [name.lower().rstrip(".") for name in allowed]

    def _allows(self, name: str, on_loopback: bool) -> bool:
        if on_loopback and is_loopback_host(name):
            return True
        if not self.allowed:
            return not on_loopback
        return host_matches(name, self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server")
            on_loopback = bool(server) and _is_loopback_address(str(server[0]))
            hosts = [value.decode("latin-1") for name, value in scope["headers"] if name.lower() == b"host"]
            if len(hosts) > 1 or not all(self._allows(_host_name(host), on_loopback) for host in hosts):
                error = HostNotAllowed(f"this service does not answer for Host {hosts[0][:100]!r}")
                return await reject(error, scope, receive, send)
        await self.app(scope, receive, send)


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http.edge:proxy_middlewares`):
    the middlewares Serve's proxy wraps around itself, last outermost. In order, a request meets the
    head size limit, the header filter, then the body guard, before Serve sees it."""
    return [
        Middleware(BodyGuard, limits_for=proxy_body_limits),
        Middleware(ServeHeaderFilter),
        Middleware(HeadSizeLimit),
    ]
