"""Stream events as Server-Sent Events, framed by sse-starlette.

Events are `data: <json>` plus a blank line (fal's framing, `\n` separators); failures are
`event: error` with `{"detail", "error_type"}`, which every SSE client can tell from a result.
"""

from __future__ import annotations

from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from serve_app.contract.errors import ServiceError

SEPARATOR = "\n"


def encode_event(event: BaseModel, event_id: str | None = None) -> ServerSentEvent:
    """A stream event (preview, final) or a status object as one SSE event."""
    return ServerSentEvent(data=event.model_dump_json(), id=event_id, sep=SEPARATOR)


def error_event(error: ServiceError) -> ServerSentEvent:
    return ServerSentEvent(data=error.body().model_dump_json(), event="error", sep=SEPARATOR)


def keepalive_comment() -> ServerSentEvent:
    """An SSE comment: ignored by clients, but traffic for proxies with idle timeouts."""
    return ServerSentEvent(comment="keepalive", sep=SEPARATOR)
