"""fal's `?fal_webhook=URL`: after a job ends, POST its outcome there, to allowed hosts only.

A service that calls any URL a client names is an SSRF hole (cloud metadata, internal admin
ports), so destinations must match `webhook_allowed_hosts`; a webhook that would not be called
is refused at submit, never dropped silently later.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import httpx

from serve_app.contract.errors import WebhookNotAllowed
from serve_app.contract.queue import WebhookPayload
from serve_app.queue.records import JobRecord

logger = logging.getLogger("ray.serve")


def check_webhook_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL if the config allows calling it; `WebhookNotAllowed` otherwise."""
    if not allowed_hosts:
        raise WebhookNotAllowed("webhooks are off on this service (`webhook_allowed_hosts` is empty)")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise WebhookNotAllowed("fal_webhook must be an http(s) URL with a host name and no credentials")
    if not any(host == allowed or (allowed.startswith(".") and host.endswith(allowed)) for allowed in allowed_hosts):
        raise WebhookNotAllowed(f"webhook host {host!r} is not in this service's `webhook_allowed_hosts`")
    return url


def webhook_payload(record: JobRecord) -> WebhookPayload:
    """fal's webhook body: OK with the result as `payload`, or ERROR with the error's body."""
    error = record.error
    return WebhookPayload(
        request_id=record.request_id,
        gateway_request_id=record.request_id,
        status="OK" if error is None else "ERROR",
        payload=record.result if error is None else error.model_dump(),
        error=None if error is None else str(error.detail),
    )


async def deliver(url: str, payload: WebhookPayload, timeout_s: float, attempts: int) -> bool:
    """POST `payload`, retrying transport errors and 5xx with backoff; True once a 2xx came back."""
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(attempts):
            try:
                response = await client.post(
                    url, content=payload.model_dump_json(), headers={"content-type": "application/json"}
                )
                if response.is_success:
                    return True
                if response.status_code < 500:
                    logger.warning("Webhook %s refused the result: HTTP %d", url, response.status_code)
                    return False
            except httpx.HTTPError as error:
                logger.warning("Webhook %s failed (attempt %d): %s", url, attempt + 1, error)
            await asyncio.sleep(min(2**attempt, 30))
    return False
