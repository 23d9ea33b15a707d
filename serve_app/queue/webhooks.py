"""fal's `?fal_webhook=URL`: after a job ends, POST its outcome there, to allowed hosts only.

A service that calls any URL a client names is an SSRF hole (cloud metadata, internal admin
ports), so destinations must match `webhook_allowed_hosts`; a webhook that would not be called
is refused at submit, never dropped silently later. Deliveries go through the store's outbox
(`JobDispatcher._deliver_webhooks`): at least once, each attempt with the same body.
"""

from __future__ import annotations

import logging
from typing import Literal
from urllib.parse import urlsplit

import httpx

from serve_app.contract.errors import WebhookNotAllowed
from serve_app.contract.queue import WebhookPayload
from serve_app.host_patterns import host_matches
from serve_app.queue.records import JobRecord
from serve_app.queue.signing import WebhookSigner

logger = logging.getLogger("ray.serve")

Delivery = Literal["delivered", "retry", "refused"]


def check_webhook_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL if the config allows calling it; `WebhookNotAllowed` otherwise."""
    if not allowed_hosts:
        raise WebhookNotAllowed("webhooks are off on this service (`queue.webhook_allowed_hosts` is empty)")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise WebhookNotAllowed("fal_webhook must be an http(s) URL with a host name and no credentials")
    if not host_matches(host, allowed_hosts, star_matches_any=False):
        raise WebhookNotAllowed(f"webhook host {host!r} is not in this service's `queue.webhook_allowed_hosts`")
    return url


def webhook_payload(record: JobRecord) -> WebhookPayload:
    """fal's webhook body: OK with the result as `payload` (image URLs absolute, on the address the job
    was submitted to), or ERROR with the error's body."""
    error = record.error
    result = record.result
    if result is not None and record.base_url:
        images = [
            {**image, "url": record.base_url.rstrip("/") + image["url"]}
            if image["url"].startswith("/files/")
            else image
            for image in result.get("images", [])
        ]
        result = {**result, "images": images}
    return WebhookPayload(
        request_id=record.request_id,
        gateway_request_id=record.request_id,
        status="OK" if error is None else "ERROR",
        payload=result if error is None else error.model_dump(),
        error=None if error is None else str(error.detail),
    )


class WebhookSender:
    """One attempt of one delivery, signed as fal signs it; the outbox decides when to try again."""

    def __init__(self, timeout_s: float, signer: WebhookSigner | None = None) -> None:
        self._timeout_s = timeout_s
        self.signer = signer

    async def send(self, url: str, request_id: str, owner: str, body: str) -> Delivery:
        """ "delivered" on a 2xx, "refused" on another answer a retry would not change (a 4xx but 408 and
        429), "retry" on anything else (no answer, 5xx). Redirects are not followed."""
        headers = {"content-type": "application/json"}
        if self.signer is not None:
            headers.update(self.signer.headers(request_id, owner, body.encode()))
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False) as client:
                response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as error:
            logger.warning("Webhook for %s to %s failed: %s", request_id, url, error)
            return "retry"
        if response.is_success:
            return "delivered"
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            logger.warning("Webhook for %s: %s refused it with HTTP %d", request_id, url, response.status_code)
            return "refused"
        logger.warning("Webhook for %s: %s answered HTTP %d", request_id, url, response.status_code)
        return "retry"
