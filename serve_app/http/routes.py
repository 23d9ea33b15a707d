"""Every endpoint once, as data: its path and methods, whether it needs an API key, whether it counts
against the per-client generation limit or poll rate, and whether the status port answers it.

`build_http_app` adds the routes from this table; `RequireApiKey`, `ClientConcurrencyLimit` and the
status port's filter ask it about a request; `tests/test_routes.py` holds the front proxy's nginx
config to it. Adding an endpoint kind is a row here and its handler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.routing import compile_path

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Endpoint:
    name: str  # the handler `build_http_app` binds to it
    path: str  # Starlette's syntax: `{request_id}` is one path segment
    methods: frozenset[str]
    needs_key: bool = True  # with API keys configured
    generation: bool = False  # a stream, a run or a queue submit: counts against `max_generations_per_client`
    status_port: bool = False  # also answered on `status_port` (GET, HEAD and a CORS preflight)
    poll: bool = False  # a status poll: counts against `max_polls_per_client_per_s`
    images_in: bool = False  # its body may carry images: `inputs.max_body_bytes` and `inputs.body_timeout_s`

    @property
    def pattern(self) -> re.Pattern:
        return compile_path(self.path)[0]


class RouteTable:
    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints
        self._compiled = [(endpoint, endpoint.pattern) for endpoint in endpoints]

    def for_path(self, path: str) -> list[Endpoint]:
        return [endpoint for endpoint, pattern in self._compiled if pattern.match(path)]

    def match(self, method: str, path: str) -> Endpoint | None:
        method = "GET" if method == "HEAD" else method
        return next((endpoint for endpoint in self.for_path(path) if method in endpoint.methods), None)

    def needs_key(self, method: str, path: str) -> bool:
        """The endpoint's rule; for another method on its path, any of the path's endpoints' (conservative);
        for an unknown path, any method but a safe one."""
        endpoint = self.match(method, path)
        if endpoint is not None:
            return endpoint.needs_key
        on_path = self.for_path(path)
        return any(candidate.needs_key for candidate in on_path) if on_path else method not in SAFE_METHODS

    def counts_as_generation(self, method: str, path: str) -> bool:
        endpoint = self.match(method, path)
        return endpoint is not None and endpoint.generation

    def is_poll(self, method: str, path: str) -> bool:
        endpoint = self.match(method, path)
        return endpoint is not None and endpoint.poll

    def takes_images(self, method: str, path: str) -> bool:
        endpoint = self.match(method, path)
        return endpoint is not None and endpoint.images_in

    def on_status_port(self, method: str, path: str) -> bool:
        return method in SAFE_METHODS and any(endpoint.status_port for endpoint in self.for_path(path))


# fal fast-sdxl's two other endpoints, as path suffixes of the app id (and of the root, and of the queue).
IMAGE_TASKS = {"image-to-image": "image_to_image", "inpainting": "inpainting"}


def route_table(app_id: str) -> RouteTable:
    """This app's endpoints: run and stream at the root and at `/{app_id}` (what fal clients call), for text
    to image and at `/image-to-image` and `/inpainting` below those; fal's queue under `/queue/{app_id}`
    (submits for each task, one set of job routes), result files, fal's upload protocol, health, the
    playground."""
    get, post, put = frozenset({"GET"}), frozenset({"POST"}), frozenset({"PUT"})
    queue = f"/queue/{app_id}"
    job = f"{queue}/requests/{{request_id}}"
    image_routes = [
        Endpoint(f"{kind}_{name}", f"{base}/{task}{suffix}", post, generation=True, images_in=True)
        for task, kind in IMAGE_TASKS.items()
        for base in ("", f"/{app_id}")
        for name, suffix in (("run", ""), ("stream", "/stream"))
    ] + [
        Endpoint(f"{kind}_submit", f"{queue}/{task}", post, generation=True, images_in=True)
        for task, kind in IMAGE_TASKS.items()
    ]
    return RouteTable(
        [
            *image_routes,
            Endpoint("playground", "/", get, needs_key=False),
            Endpoint("health", "/health", get, needs_key=False, status_port=True),
            Endpoint("run", "/", post, generation=True),
            Endpoint("stream", "/stream", post, generation=True),
            Endpoint("run", f"/{app_id}", post, generation=True),
            Endpoint("stream", f"/{app_id}/stream", post, generation=True),
            Endpoint("submit", queue, post, generation=True),
            Endpoint("status", f"{job}/status", get, status_port=True, poll=True),
            Endpoint("status_stream", f"{job}/status/stream", get, poll=True),
            Endpoint("result", job, get, poll=True),
            Endpoint("cancel", f"{job}/cancel", put),
            # Result images: their URLs carry an unguessable token, as fal's CDN URLs do.
            Endpoint("file", "/files/{token}/{name}", get, needs_key=False),
            # fal's upload protocol (`fal.storage.upload`): the PUT carries no key; its URL's token is the permission.
            Endpoint("upload_initiate", "/storage/upload/initiate", post),
            Endpoint("upload_put", "/storage/upload/{token}/{name}", put, needs_key=False, images_in=True),
            # The key webhooks are signed with, as fal publishes its own: receivers fetch it without a key.
            Endpoint("jwks", "/.well-known/jwks.json", get, needs_key=False),
        ]
    )
