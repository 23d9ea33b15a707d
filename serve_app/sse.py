"""Stream events as Server-Sent Events, framed by sse-starlette.

Events are `data: <json>` plus a blank line (fal's framing, `\n` separators); failures are
`event: error` with `{"detail", "error_type"}`, which every SSE client can tell from a result.
"""

from __future__ import annotations

from sse_starlette import JSONServerSentEvent, ServerSentEvent

from serve_app.errors import ServiceError
from serve_app.schemas import ErrorBody

SEPARATOR = "\n"


def encode_event(event: dict) -> ServerSentEvent:
    """A deployment event (a `StreamEvent` as a dict: preview, final or error) as one SSE event."""
    if event.get("type") == "error":
        return _error(ErrorBody(detail=event["detail"], error_type=event["error_type"]))
    return JSONServerSentEvent(event, sep=SEPARATOR)


def error_event(error: ServiceError) -> ServerSentEvent:
    return _error(error.body())


def _error(body: ErrorBody) -> ServerSentEvent:
    return JSONServerSentEvent(body.model_dump(), event="error", sep=SEPARATOR)


def keepalive_comment() -> ServerSentEvent:
    """An SSE comment: ignored by clients, but traffic for proxies with idle timeouts."""
    return ServerSentEvent(comment="keepalive", sep=SEPARATOR)


def is_terminal(event: dict) -> bool:
    return event.get("type") in ("final", "error")
