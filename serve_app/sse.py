"""Stream events as Server-Sent Events, framed by sse-starlette.

Events are `data: <json>` plus a blank line (fal's framing, `\\n` separators); failures are
`event: error` with `{"detail", "error_type"}`, which every SSE client can tell from a result.
"""

from __future__ import annotations

from sse_starlette import JSONServerSentEvent, ServerSentEvent

SEPARATOR = "\n"


def encode_event(event: dict) -> ServerSentEvent:
    """A deployment event (`type` preview, final or error) as one SSE event."""
    if event.get("type") == "error":
        return error_event(event["detail"], event["error_type"])
    return JSONServerSentEvent(event, sep=SEPARATOR)


def error_event(detail: str, error_type: str) -> ServerSentEvent:
    return JSONServerSentEvent({"detail": detail, "error_type": error_type}, event="error", sep=SEPARATOR)


def keepalive_comment() -> ServerSentEvent:
    """An SSE comment: ignored by clients, but traffic for proxies with idle timeouts."""
    return ServerSentEvent(comment="keepalive", sep=SEPARATOR)


def is_terminal(event: dict) -> bool:
    return event.get("type") in ("final", "error")
