"""The route table: every endpoint's policy in one place, and what is built from it (the app's routes,
the key check, the per-client limit, the status port's filter) and held to it (the front proxy)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.responses import JSONResponse

from serve_app.config import AppConfig
from serve_app.http.app import build_http_app
from serve_app.http.edge import IMAGE_ROUTE
from serve_app.http.queue_api import QueueApi
from serve_app.http.routes import Endpoint, route_table

REPO = Path(__file__).resolve().parents[1]
APP_ID = "local/sdxl"
TABLE = route_table(APP_ID)
REQUEST_ID = "5b1f4c1e-0d7a-4b5e-9b1a-2f4e6c8d0a11"


def example_path(endpoint: Endpoint) -> str:
    return endpoint.path.replace("{request_id}", REQUEST_ID).replace("{token}", "Zx9").replace("{name}", "0.jpeg")


def nginx_location(marker: str) -> re.Pattern:
    """The pattern of the front proxy's one regex location whose block contains `marker`."""
    conf = (REPO / "configs" / "nginx-front-proxy.conf").read_text()
    blocks = re.split(r"\n\s*location ", conf)[1:]
    (pattern,) = [block.split()[1] for block in blocks if block.startswith("~") and marker in block]
    return re.compile(pattern)


def nginx_status_location() -> re.Pattern:
    """The front proxy's location that sends requests to the status port."""
    return nginx_location("http://sdxl_status;")


@pytest.mark.parametrize("endpoint", TABLE.endpoints, ids=lambda endpoint: f"{endpoint.name} {endpoint.path}")
def test_the_front_proxy_sends_exactly_the_status_port_endpoints_there(endpoint: Endpoint) -> None:
    assert bool(nginx_status_location().match(example_path(endpoint))) == endpoint.status_port


def nginx_image_location() -> re.Pattern:
    """The front proxy's location with the larger body limit."""
    return nginx_location("client_max_body_size")


@pytest.mark.parametrize("endpoint", TABLE.endpoints, ids=lambda endpoint: f"{endpoint.name} {endpoint.path}")
def test_the_larger_body_limit_is_for_exactly_the_image_routes(endpoint: Endpoint) -> None:
    """The route table says which routes take images; the front proxy's location and Serve's proxy (which
    knows no app id: `IMAGE_ROUTE`) give exactly those the larger body limit."""
    path = example_path(endpoint)
    assert bool(nginx_image_location().search(path)) == endpoint.images_in
    assert bool(IMAGE_ROUTE.fullmatch(path)) == endpoint.images_in


def test_the_front_proxy_routes_them_for_any_app_id() -> None:
    other = route_table("fal-ai/fast-sdxl")
    status = next(endpoint for endpoint in other.endpoints if endpoint.name == "status")
    assert nginx_status_location().match(example_path(status))


@pytest.mark.parametrize(
    ("method", "path", "needs_key", "generation", "status_port"),
    [
        ("POST", "/", True, True, False),
        ("GET", "/", False, False, False),
        ("POST", f"/{APP_ID}/stream", True, True, False),
        ("POST", f"/queue/{APP_ID}", True, True, False),
        ("GET", f"/queue/{APP_ID}/requests/{REQUEST_ID}/status", True, False, True),
        ("HEAD", f"/queue/{APP_ID}/requests/{REQUEST_ID}/status", True, False, True),
        ("GET", f"/queue/{APP_ID}/requests/{REQUEST_ID}", True, False, False),
        ("PUT", f"/queue/{APP_ID}/requests/{REQUEST_ID}/cancel", True, False, False),
        ("GET", "/health", False, False, True),
        ("GET", "/files/Zx9/0.jpeg", False, False, False),
        ("POST", "/no/such/route", True, False, False),  # unknown and unsafe: a key is asked before the 404
        ("GET", "/no/such/route", False, False, False),
    ],
)
def test_policy_per_request(method: str, path: str, needs_key: bool, generation: bool, status_port: bool) -> None:
    assert TABLE.needs_key(method, path) == needs_key
    assert TABLE.counts_as_generation(method, path) == generation
    assert TABLE.on_status_port(method, path) == status_port


class NoRelay:
    async def stream(self, body):
        return JSONResponse({})

    async def run(self, body):
        return JSONResponse({})


async def healthy():
    return JSONResponse({"status": "ok"})


def test_the_app_has_exactly_the_tables_routes() -> None:
    config = AppConfig()
    app = build_http_app(config, TABLE, NoRelay(), QueueApi(None, config), healthy)
    served = {
        (method, route.path)
        for route in app.routes
        if getattr(route, "name", None) in {endpoint.name for endpoint in TABLE.endpoints}
        for method in route.methods - {"HEAD"}
    }
    assert served == {(method, endpoint.path) for endpoint in TABLE.endpoints for method in endpoint.methods}


def test_the_openapi_schema_documents_the_queue() -> None:
    config = AppConfig()
    with TestClient(build_http_app(config, TABLE, NoRelay(), QueueApi(None, config), healthy)) as client:
        schema = client.get("/openapi.json").json()
    job = f"/queue/{APP_ID}/requests/{{request_id}}"

    def answer(path: str, method: str, status: str = "200") -> dict:
        return schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]

    assert answer(f"/queue/{APP_ID}", "post") == {"$ref": "#/components/schemas/QueueSubmitted"}
    assert answer(f"{job}/status", "get") == {"$ref": "#/components/schemas/QueueStatus"}
    assert answer(job, "get") == {"$ref": "#/components/schemas/GenerationResult"}
    assert answer(f"{job}/cancel", "put", "202") == {"$ref": "#/components/schemas/CancelAccepted"}
    documented = schema["components"]["schemas"].keys()
    assert {"QueueStatus", "LogEntry", "ErrorBody", "PreviewEvent", "FinalEvent"} <= documented
