"""The edge and app middlewares as plain ASGI apps: header filtering, Host checks, body and head bounds,
security headers, the per-client limit, and the validation-error cap of the built app (in-process;
`tests/integration/test_hostile_edge.py` sends the same over real sockets)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.responses import HTMLResponse, Response
from starlette.types import Message, Receive, Scope, Send

from serve_app.config import AppConfig
from serve_app.http.app import build_http_app
from serve_app.http.edge import (
    BodyGuard,
    BodySlots,
    HeadSizeLimit,
    HostAllowList,
    _host_name,
    is_valid_request_id,
    proxy_middlewares,
    without_client_controls,
)
from serve_app.http.errors import MAX_VALIDATION_ERRORS
from serve_app.http.middleware import (
    CLIENT_SCOPE_KEY,
    ApiKeys,
    ClientConcurrencyLimit,
    ClientLedger,
    ClientPollLimit,
    SecurityHeaders,
)
from serve_app.http.queue_api import QueueApi
from serve_app.http.routes import route_table


def http_scope(
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "POST",
    path: str = "/",
    server: tuple[str, int] | None = ("127.0.0.1", 8000),
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "server": server,
        "client": client,
    }


class Exchange:
    """One request through an ASGI app: scripted `receive` messages (a float is a pause, `None` blocks
    forever), what was sent back, and whether the app behind the middleware ran."""

    def __init__(self, *incoming: Message | float | None) -> None:
        self.incoming = list(incoming)
        self.received = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        while self.incoming:
            item = self.incoming.pop(0)
            if item is None:
                await asyncio.Event().wait()
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            self.received += 1
            return item
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {name.decode(): value.decode() for name, value in start["headers"]}

    @property
    def json(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def chunk(body: bytes, more: bool = True) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


class EchoBody:
    """An app that reads the body and answers its length; records that it ran."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await JSONResponse({"length": len(body)})(scope, receive, send)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("3f2a9c1e-7b4d-4e8a-9f1c-2d3e4f5a6b7c", True),
        ("req_01HZX.a:b-c", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("é", False),
        ("€", False),
        ("a b", False),
        ("a\tb", False),
        ("id\r\nset-cookie: x", False),
        (b"\xff\xfe", False),
        (b"\xc3\xa9", False),
    ],
)
def test_request_ids(value: str | bytes, valid: bool) -> None:
    assert is_valid_request_id(value) is valid


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ([(b"x-request-id", b"abc-123")], [(b"x-request-id", b"abc-123")]),
        ([(b"x-request-id", b"\xff")], []),
        ([(b"x-request-id", "€".encode())], []),
        ([(b"x-request-id", b"a" * 64 * 1024)], []),
        ([(b"x-request-id", b"one"), (b"x-request-id", b"two")], []),
        ([(b"x-request-disconnect-disabled", b"?1")], []),
        ([(b"x-request-timeout-seconds", b"0.001")], []),
        ([(b"x-request-timeout-seconds", b"\xff")], []),
        ([(b"serve_multiplexed_model_id", b"\xff")], []),
        ([(b"serve-multiplexed-model-id", b"m")], []),
        ([(b"x-session-id", b"\xff")], []),
        ([(b"x_session_id", b"s")], []),
        ([(b"x-serve-router-target", b"replica-1")], []),
        ([(b"content-type", b"application/json"), (b"x-other", b"\xff")], None),  # None: all kept
    ],
)
def test_serve_control_headers_and_bad_request_ids_are_dropped(headers: list, kept: list | None) -> None:
    assert without_client_controls(headers) == (headers if kept is None else kept)


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8000", "localhost"),
        ("LOCALHOST.", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("evil.example:80", "evil.example"),
        ("::1", "::1"),
    ],
)
def test_host_names(header: str, name: str) -> None:
    assert _host_name(header) == name


LOOPBACK = ("127.0.0.1", 8000)
PUBLIC = ("10.1.2.3", 8000)


@pytest.mark.parametrize(
    ("allowed", "server", "host", "ok"),
    [
        ([], LOOPBACK, "localhost:8000", True),
        ([], LOOPBACK, "127.0.0.1:8000", True),
        ([], LOOPBACK, "127.1.2.3", True),
        ([], LOOPBACK, "[::1]:8000", True),
        ([], LOOPBACK, "app.localhost", True),
        ([], LOOPBACK, "rebind.attacker.example:8000", False),
        ([], LOOPBACK, "127.0.0.1.nip.io", False),
        ([], LOOPBACK, "0.0.0.0", False),
        ([], ("::1", 8000), "attacker.example", False),
        ([], PUBLIC, "anything.example", True),
        ([], None, "anything.example", True),  # a Unix socket
        (["sdxl.example.com"], LOOPBACK, "sdxl.example.com", True),
        (["sdxl.example.com"], LOOPBACK, "localhost", True),
        (["sdxl.example.com"], PUBLIC, "localhost", False),
        (["sdxl.example.com"], PUBLIC, "other.example.com", False),
        ([".example.com"], PUBLIC, "a.b.example.com", True),
        ([".example.com"], PUBLIC, "example.com.evil", False),
        (["*"], LOOPBACK, "anything.example", True),
    ],
)
def test_host_allow_list(allowed: list[str], server: tuple | None, host: str, ok: bool) -> None:
    app = EchoBody()
    exchange = Exchange()
    scope = http_scope([(b"host", host.encode())], method="GET", server=server)
    asyncio.run(HostAllowList(app, allowed)(scope, exchange.receive, exchange.send))
    assert (exchange.status == 200) is ok
    if not ok:
        assert exchange.status == 400 and exchange.json["error_type"] == "host_not_allowed"


def test_two_host_headers_are_refused() -> None:
    exchange = Exchange()
    scope = http_scope([(b"host", b"localhost"), (b"host", b"attacker.example")], method="GET")
    asyncio.run(HostAllowList(EchoBody(), [])(scope, exchange.receive, exchange.send))
    assert exchange.status == 400


def test_a_huge_head_is_431() -> None:
    app = EchoBody()
    exchange = Exchange()
    scope = http_scope([(b"x-padding", b"x" * 40_000)], method="GET")
    asyncio.run(HeadSizeLimit(app)(scope, exchange.receive, exchange.send))
    assert exchange.status == 431 and exchange.json["error_type"] == "headers_too_large"
    assert exchange.headers["connection"] == "close"
    assert not app.bodies


def run_guard(guard: BodyGuard, headers: list, exchange: Exchange) -> None:
    asyncio.run(guard(http_scope(headers), exchange.receive, exchange.send))


def test_a_declared_oversized_body_is_413_before_anything_is_read() -> None:
    """Nothing read: uvicorn sends `100 Continue` only when the app first calls `receive`."""
    app = EchoBody()
    exchange = Exchange(chunk(b"x"))
    run_guard(BodyGuard(app, max_bytes=1000), [(b"content-length", b"2000"), (b"expect", b"100-continue")], exchange)
    assert exchange.status == 413 and exchange.json["error_type"] == "request_too_large"
    assert exchange.headers["connection"] == "close"
    assert exchange.received == 0 and not app.bodies


def test_a_chunked_body_over_the_limit_is_413_not_a_parse_error() -> None:
    app = EchoBody()
    exchange = Exchange(*[chunk(b"x" * 400)] * 5)
    run_guard(BodyGuard(app, max_bytes=1000), [(b"transfer-encoding", b"chunked")], exchange)
    assert exchange.status == 413 and exchange.json["error_type"] == "request_too_large"
    assert not app.bodies


def test_large_bodies_read_at_once_are_bounded_small_ones_are_not() -> None:
    """An image route's body may be tens of MiB for a minute, read before any key is checked: past
    `LARGE_BODIES_AT_ONCE` such reads per process the next is 503 `overloaded` at once, with Retry-After.
    A small body on the same route (a URL input) never waits for that."""
    slots = BodySlots(1)
    slots.take()  # one large body already arriving
    large_route = lambda scope: (50 * 2**20, 60.0)  # noqa: E731
    app = EchoBody()
    exchange = Exchange(chunk(b"x" * 100))
    run_guard(
        BodyGuard(app, limits_for=large_route, large_bodies=slots), [(b"transfer-encoding", b"chunked")], exchange
    )
    assert exchange.status == 503 and exchange.json["error_type"] == "overloaded"
    assert exchange.headers["retry-after"] == "1" and exchange.received == 0
    small = Exchange(chunk(b"x" * 100, more=False))
    run_guard(BodyGuard(app, limits_for=large_route, large_bodies=slots), [(b"content-length", b"100")], small)
    assert small.status == 200 and slots.used == 1
    slots.give()
    freed = Exchange(chunk(b"x" * 100, more=False))
    run_guard(BodyGuard(app, limits_for=large_route, large_bodies=slots), [(b"transfer-encoding", b"chunked")], freed)
    assert freed.status == 200 and slots.used == 0  # given back once read


def test_a_stalled_body_is_408_at_the_deadline() -> None:
    app = EchoBody()
    exchange = Exchange(chunk(b'{"prompt":'), None)
    loop_time = asyncio.new_event_loop()
    started = loop_time.time()
    loop_time.run_until_complete(
        BodyGuard(app, timeout_s=0.3)(http_scope([(b"content-length", b"100")]), exchange.receive, exchange.send)
    )
    elapsed = loop_time.time() - started
    loop_time.close()
    assert exchange.status == 408 and exchange.json["error_type"] == "request_timeout"
    assert exchange.headers["connection"] == "close"
    assert 0.25 < elapsed < 2 and not app.bodies


def test_a_trickled_body_is_408_even_though_bytes_keep_coming() -> None:
    """The deadline is for the whole body, not between reads (unlike nginx's `client_body_timeout`)."""
    app = EchoBody()
    exchange = Exchange(*[item for _ in range(20) for item in (0.05, chunk(b"x"))])
    run_guard(BodyGuard(app, timeout_s=0.3), [(b"transfer-encoding", b"chunked")], exchange)
    assert exchange.status == 408 and not app.bodies


def test_a_client_leaving_mid_body_starts_nothing() -> None:
    app = EchoBody()
    exchange = Exchange(chunk(b"{"), {"type": "http.disconnect"})
    run_guard(BodyGuard(app), [(b"content-length", b"100")], exchange)
    assert exchange.sent == [] and not app.bodies


def test_the_body_is_replayed_whole_and_then_only_a_disconnect_comes() -> None:
    app = EchoBody()
    exchange = Exchange(chunk(b"ab"), chunk(b"cd", more=False))
    run_guard(BodyGuard(app), [(b"transfer-encoding", b"chunked")], exchange)
    assert app.bodies == [b"abcd"] and exchange.status == 200


class WaitsForever:
    """A route that would run a long generation; records whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the body
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


@pytest.mark.parametrize("stop", [True, False])
def test_a_disconnect_after_the_body_cancels_the_app_only_when_asked(stop: bool) -> None:
    app = WaitsForever()
    exchange = Exchange(chunk(b"{}", more=False), 0.1, {"type": "http.disconnect"})
    guard = BodyGuard(app, stop_on_disconnect=stop)

    async def run() -> None:
        await asyncio.wait_for(guard(http_scope([(b"content-length", b"2")]), exchange.receive, exchange.send), 1)

    if stop:
        asyncio.run(run())
        assert app.cancelled
    else:
        with pytest.raises(TimeoutError):
            asyncio.run(run())


def test_requests_without_a_body_pass_straight_through() -> None:
    app = EchoBody()
    exchange = Exchange(chunk(b"", more=False))
    run_guard(BodyGuard(app), [], exchange)
    assert app.bodies == [b""]


def test_the_proxy_callback_returns_starlette_middlewares() -> None:
    """What Ray's `validate_http_proxy_callback_return` accepts: a list of `Middleware`, outermost last."""
    classes = [middleware.cls.__name__ for middleware in proxy_middlewares()]
    assert classes == ["BodyGuard", "ServeHeaderFilter", "HeadSizeLimit"]


def test_html_gets_a_policy_that_runs_only_its_own_inline_script() -> None:
    script = b"document.title = 'x';"
    page = b"<html><head><script src='/s.js'></script><script>" + script + b"</script></head></html>"
    exchange = Exchange()
    asyncio.run(SecurityHeaders(HTMLResponse(page))(http_scope(method="GET"), exchange.receive, exchange.send))
    policy = exchange.headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert "http" not in policy  # no third-party origin
    assert exchange.headers["x-content-type-options"] == "nosniff"
    assert exchange.headers["x-frame-options"] == "DENY"


def test_other_responses_get_the_headers_without_being_held() -> None:
    exchange = Exchange()
    app = SecurityHeaders(Response(b"{}", media_type="application/json"))
    asyncio.run(app(http_scope(method="GET"), exchange.receive, exchange.send))
    assert exchange.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert exchange.headers["x-content-type-options"] == "nosniff"


class Gate:
    """A route held open until released: a generation in flight."""

    def __init__(self, job_id: str | None = None) -> None:
        self.release = asyncio.Event()
        self.job_id = job_id
        self.ledger: ClientLedger | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.release.wait()
        if self.job_id and self.ledger is not None:  # what the queue API does for a submit it admitted
            self.ledger.add_job(scope[CLIENT_SCOPE_KEY], self.job_id)
        await JSONResponse({})(scope, receive, send)


def limiter(app: Gate, jobs_in_flight: set[str] | None = None, keys: ApiKeys | None = None) -> ClientConcurrencyLimit:
    active = jobs_in_flight if jobs_in_flight is not None else set()
    app.ledger = ClientLedger(active.__contains__)
    return ClientConcurrencyLimit(
        app, limit=1, routes=route_table("local/sdxl"), ledger=app.ledger, keys=keys or ApiKeys([])
    )


def test_a_second_generation_of_one_client_is_429_with_retry_after() -> None:
    async def scenario() -> tuple[Exchange, Exchange, Exchange]:
        gate = Gate()
        limit = limiter(gate)
        first, second, other = Exchange(), Exchange(), Exchange()
        running = asyncio.ensure_future(limit(http_scope(path="/stream"), first.receive, first.send))
        await asyncio.sleep(0.01)
        await limit(http_scope(path="/"), second.receive, second.send)
        other_client = asyncio.ensure_future(
            limit(http_scope(path="/", client=("10.0.0.9", 1)), other.receive, other.send)
        )
        await asyncio.sleep(0.01)
        gate.release.set()
        await asyncio.gather(running, other_client)
        return first, second, other

    first, second, other = asyncio.run(scenario())
    assert first.status == 200 and other.status == 200
    assert second.status == 429 and second.json["error_type"] == "too_many_requests"
    assert int(second.headers["retry-after"]) >= 1


def test_the_limit_frees_when_a_generation_ends_and_ignores_other_routes() -> None:
    async def scenario() -> list[int | None]:
        gate = Gate()
        gate.release.set()
        limit = limiter(gate)
        statuses = []
        for method, path in [("POST", "/"), ("POST", "/"), ("GET", "/health"), ("POST", "/queue/x/other")]:
            exchange = Exchange()
            await limit(http_scope(method=method, path=path), exchange.receive, exchange.send)
            statuses.append(exchange.status)
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 200, 200]


def test_queue_jobs_count_until_they_complete() -> None:
    active: set[str] = set()

    async def submit(limit: ClientConcurrencyLimit) -> int | None:
        exchange = Exchange()
        await limit(http_scope(path="/queue/local/sdxl"), exchange.receive, exchange.send)
        return exchange.status

    async def scenario() -> list[int | None]:
        gate = Gate(job_id="job-1")
        gate.release.set()
        limit = limiter(gate, active)
        active.add("job-1")
        statuses = [await submit(limit), await submit(limit)]  # job-1 queued: the second is refused
        active.discard("job-1")  # completed
        statuses.append(await submit(limit))
        return statuses

    assert asyncio.run(scenario()) == [200, 429, 200]


def test_with_api_keys_the_client_is_its_key_not_its_address() -> None:
    keys = ApiKeys(["k1", "k2"])
    limit = limiter(Gate(), keys=keys)
    same_address = [(b"authorization", b"Key k1")], [(b"authorization", b"Key k2")]
    assert limit.client(http_scope(same_address[0])) != limit.client(http_scope(same_address[1]))
    assert "k1" not in limit.client(http_scope(same_address[0]))  # hashed, not kept in clear


class FakeRelay:
    async def stream(self, body):
        return JSONResponse({"stream": True})

    async def run(self, body):
        return JSONResponse({"prompt": body.prompt})


async def healthy():
    return JSONResponse({"status": "ok"})


@pytest.fixture()
def app_client() -> TestClient:
    """The app as built for the ingress, with a stand-in for the relay (no Serve here)."""
    config = AppConfig(http={"allowed_hosts": ["testserver"]})
    app = build_http_app(config, route_table(config.app_id), FakeRelay(), QueueApi(None, config), healthy)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "a \xff fox"}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's depth
        b"\x00\x00\x00{",  # an encoding json.loads guesses, then cannot decode
    ],
    ids=["not utf-8", "nested too deep", "garbled encoding"],
)
def test_malformed_json_of_every_kind_is_422(app_client: TestClient, raw: bytes) -> None:
    response = app_client.post("/", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation_error"


def test_validation_errors_are_capped(app_client: TestClient) -> None:
    fields = {f"f{i}": 0 for i in range(80_000)}
    raw = json.dumps({"prompt": "a fox", **fields, "x" * 50_000: 1}, separators=(",", ":")).encode()
    assert len(raw) < 1024 * 1024
    response = app_client.post("/", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == MAX_VALIDATION_ERRORS + 1
    assert detail[-1]["type"] == "too_many_errors" and "more errors not shown" in detail[-1]["msg"]
    assert len(response.content) < 20_000


def test_one_huge_unknown_field_name_is_not_echoed_whole(app_client: TestClient) -> None:
    raw = json.dumps({"prompt": "a fox", "x" * 500_000: 1}).encode()
    response = app_client.post("/", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and len(response.content) < 2_000


def test_docs_load_no_third_party_script(app_client: TestClient) -> None:
    page = app_client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>", 1)[-1].split("</script>")[0]
    assert "/static-offline-docs/swagger-ui-bundle.js" in page.text
    assert app_client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert "script-src 'self' 'sha256-" in page.headers["content-security-policy"]


def test_the_playground_has_its_policy(app_client: TestClient) -> None:
    page = app_client.get("/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "script-src 'self' 'sha256-" in page.headers["content-security-policy"]


def test_a_client_polling_too_fast_is_429_others_are_not() -> None:
    async def scenario() -> tuple[list[int | None], int | None, int | None, int | None]:
        gate = Gate()
        gate.release.set()
        limit = ClientPollLimit(gate, per_s=5, routes=route_table("local/sdxl"), keys=ApiKeys([]))
        status = "/queue/local/sdxl/requests/5b1f4c1e-0d7a-4b5e-9b1a-2f4e6c8d0a11/status"

        async def poll(path: str = status, client: tuple = ("10.0.0.1", 1)) -> int | None:
            exchange = Exchange()
            await limit(http_scope(method="GET", path=path, client=client), exchange.receive, exchange.send)
            return exchange.status

        burst = [await poll() for _ in range(11)]  # the bucket holds 10 (two seconds' worth, at least 10)
        other = await poll(client=("10.0.0.2", 1))
        health = await poll(path="/health")
        await asyncio.sleep(0.3)  # 1.5 polls' worth refilled
        return burst, other, health, await poll()

    burst, other, health, later = asyncio.run(scenario())
    assert burst == [200] * 10 + [429]
    assert (other, health, later) == (200, 200, 200)
