"""`POST /stream` and `POST /` through the relay and the in-process generation client: a real tiny engine,
no Serve. What a client sees when a generation succeeds, fails mid-stream, is left by its client, is
refused for overload, or finds no replica."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.responses import Response

from deployments.engine import SDXLEngine
from deployments.in_process import InProcessGenerationClient
from serve_app.config import HttpConfig, RequestConfig
from serve_app.contract.errors import Overloaded, ReplicaFailed
from serve_app.contract.events import GenerationResult, RunMode
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.client import GenerationCall
from serve_app.http.relay import RETRIES, GenerationRelay, StreamFailed
from tests.tiny_engine import resolved, tiny_engine

REQUEST = resolved(num_inference_steps=4, width=128, height=128, seed=3, preview_interval=1)
HTTP = HttpConfig(first_event_wait_s=0.2, keepalive_s=30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def engine(cache: str) -> SDXLEngine:
    """One per test: an engine lives on one event loop (a replica's), and each test runs its own."""
    return tiny_engine(cache)


def relay_over(client, requests: RequestConfig | None = None) -> tuple[GenerationRelay, list[str]]:
    rejections: list[str] = []
    return GenerationRelay(client, requests or RequestConfig(), HTTP, on_rejection=rejections.append), rejections


class Received:
    """An SSE response driven as a client reads it: its status, events, and whether it was cut off."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.cut = False

    @property
    def events(self) -> list[tuple[str, dict]]:
        parsed = []
        for block in self.body.decode().split("\n\n"):
            lines = [line for line in block.split("\n") if line and not line.startswith(":")]
            if lines:
                kind = next((line[len("event: ") :] for line in lines if line.startswith("event: ")), "message")
                data = next(line[len("data: ") :] for line in lines if line.startswith("data: "))
                parsed.append((kind, json.loads(data)))
        return parsed


async def receive_response(response: Response, leave_after_events: int | None = None) -> Received:
    received = Received()
    left = asyncio.Event()

    async def receive() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            received.status = message["status"]
            received.headers = {name.decode(): value.decode() for name, value in message["headers"]}
        elif message["type"] == "http.response.body":
            received.body += message.get("body", b"")
            if leave_after_events is not None and received.body.count(b"\n\n") >= leave_after_events:
                left.set()

    scope = {"type": "http", "method": "POST", "path": "/stream", "headers": [], "http_version": "1.1"}
    try:
        await response(scope, receive, send)
    except StreamFailed:
        received.cut = True
    return received


def test_a_stream_is_previews_then_the_final_image(engine: SDXLEngine) -> None:
    async def scenario() -> Received:
        relay, _ = relay_over(InProcessGenerationClient(engine))
        return await receive_response(await relay.stream(REQUEST))

    received = asyncio.run(scenario())
    assert received.status == 200 and not received.cut
    kinds = [(kind, data["type"]) for kind, data in received.events]
    assert kinds == [("message", "preview")] * 4 + [("message", "final")]
    assert received.events[-1][1]["seed"] == 3
    assert not engine.busy


def test_a_failure_mid_stream_is_an_error_event_then_a_cut(engine: SDXLEngine) -> None:
    unet = engine.models.pipeline.unet
    forward, calls = unet.forward, []

    def fails_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("no more steps")
        return forward(*args, **kwargs)

    async def scenario() -> Received:
        relay, _ = relay_over(InProcessGenerationClient(engine))
        return await receive_response(await relay.stream(REQUEST))

    unet.forward = fails_at_the_third_step
    try:
        received = asyncio.run(scenario())
    finally:
        unet.forward = forward
    assert received.status == 200 and received.cut
    kinds = [kind for kind, _ in received.events]  # previews before the failure (one may be dropped under load)
    assert kinds[-1] == "error" and 1 <= len(kinds[:-1]) <= 2 and set(kinds[:-1]) == {"message"}
    assert received.events[-1][1] == {"detail": "the generation failed", "error_type": "generation_failed"}


def test_a_client_that_leaves_stops_the_generation_within_a_step(engine: SDXLEngine) -> None:
    steps: list[int] = []
    engine_client = InProcessGenerationClient(engine)
    long = REQUEST.model_copy(update={"num_inference_steps": 40})
    unet = engine.models.pipeline.unet
    forward = unet.forward

    def counted(*args, **kwargs):
        steps.append(1)
        return forward(*args, **kwargs)

    async def scenario() -> Received:
        relay, _ = relay_over(engine_client)
        received = await receive_response(await relay.stream(long), leave_after_events=2)
        while engine.busy:  # the slot frees once the pipeline thread has stopped
            await asyncio.sleep(0.01)
        return received

    unet.forward = counted
    try:
        received = asyncio.run(scenario())
    finally:
        unet.forward = forward
    assert [data["type"] for _, data in received.events][:2] == ["preview", "preview"]
    assert len(steps) < 40 // 2  # stopped long before the end (each step is one UNet call with CFG)


def test_post_answers_the_result_as_json(engine: SDXLEngine) -> None:
    async def scenario() -> GenerationResult | Response:
        relay, _ = relay_over(InProcessGenerationClient(engine))
        return await relay.run(REQUEST)

    result = asyncio.run(scenario())
    assert isinstance(result, GenerationResult) and result.seed == 3 and len(result.images) == 1


class RefusingCall(GenerationCall):
    """A replica queue that is full: what Serve's handle raises as `BackPressureError` (fake: the in-process
    engine queues instead of refusing)."""

    async def _receive(self):
        raise Overloaded(retry_after_s=4)

    async def _after_final(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class SilentCall(RefusingCall):
    """No replica ever takes the request (fake: an in-process engine always exists)."""

    async def _receive(self):
        await asyncio.Event().wait()


class FakeClient:
    def __init__(self, call_class: type[GenerationCall]) -> None:
        self.call_class = call_class

    def events(self, request: ResolvedRequest, mode: RunMode) -> GenerationCall:
        return self.call_class()

    async def ready_replicas(self) -> int:
        return 1


def test_overload_before_the_stream_starts_is_a_503_with_retry_after() -> None:
    async def scenario() -> tuple[Response, Response, list[str]]:
        relay, rejections = relay_over(FakeClient(RefusingCall))
        return await relay.stream(REQUEST), await relay.run(REQUEST), rejections

    stream, run, rejections = asyncio.run(scenario())
    for response in (stream, run):
        assert response.status_code == 503 and response.headers["retry-after"] == "4"
        assert json.loads(response.body)["error_type"] == "overloaded"
    assert rejections == ["overloaded", "overloaded"]


def test_no_replica_in_time_is_a_queue_timeout_never_a_hang() -> None:
    requests = RequestConfig(queue_timeout_s=0.5, timeout_s=0.5)

    async def scenario() -> tuple[Received, Response, list[str]]:
        relay, rejections = relay_over(FakeClient(SilentCall), requests)
        stream = await receive_response(await relay.stream(REQUEST))  # committed to 200 after 0.2 s
        return stream, await relay.run(REQUEST), rejections

    stream, run, rejections = asyncio.run(scenario())
    assert stream.status == 200 and stream.cut
    assert stream.events == [
        ("error", {"detail": "no model replica took the request within 0.5 s", "error_type": "queue_timeout"})
    ]
    assert run.status_code == 503 and json.loads(run.body)["error_type"] == "queue_timeout"
    assert rejections == ["queue_timeout", "queue_timeout"]


class ReplicaLeftCall(RefusingCall):
    """A replica that left service (its device died): it refuses the request at once, as retryable."""

    async def _receive(self):
        raise ReplicaFailed("this model replica left service after a device_error")


class FirstReplicasGone:
    """The first `gone` calls reach replicas that left service; later ones reach a working engine."""

    def __init__(self, engine: SDXLEngine, gone: int) -> None:
        self._working = InProcessGenerationClient(engine)
        self.gone = gone
        self.calls = 0

    def events(self, request: ResolvedRequest, mode: RunMode) -> GenerationCall:
        self.calls += 1
        return ReplicaLeftCall() if self.calls <= self.gone else self._working.events(request, mode)

    async def ready_replicas(self) -> int:
        return 1


def test_a_request_a_dead_replica_refused_is_tried_on_another(engine: SDXLEngine) -> None:
    """Before the client has seen anything, a retryable failure (a replica that left service, or died)
    sends the request to another replica: the stream and `POST /` succeed; past `RETRIES`, the error."""

    async def scenario() -> tuple[Received, object, Response, int]:
        flaky = FirstReplicasGone(engine, gone=2)
        relay, _ = relay_over(flaky)
        stream = await receive_response(await relay.stream(REQUEST))
        flaky.calls, flaky.gone = 0, 2
        result = await relay.run(REQUEST)
        gone = FirstReplicasGone(engine, gone=RETRIES + 1)
        failed = await relay_over(gone)[0].run(REQUEST)
        return stream, result, failed, gone.calls

    stream, result, failed, calls = asyncio.run(scenario())
    assert stream.status == 200 and not stream.cut and stream.events[-1][1]["type"] == "final"
    assert isinstance(result, GenerationResult) and result.seed == 3
    assert failed.status_code == 502 and json.loads(failed.body)["error_type"] == "replica_failed"
    assert calls == RETRIES + 1
