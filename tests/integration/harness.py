"""A real Ray Serve instance for the integration tests, deployed the way `serve run <config>` does.

Apps are deployed from the project's own YAML configs (with overrides), so the tests exercise
the configs users run, not a parallel set of decorator options.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from httpx_sse import connect_sse
from PIL import Image
from ray import serve
from ray.serve._private import api as serve_private_api
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_config(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def merged_args(base: dict, override: dict) -> dict:
    """`override` over `base`, section by section (`{"model": {"source": ...}}` keeps the other model keys)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class ServeHarness:
    """Keeps the declarative config of every app deployed so far; adding one redeploys the set."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._apps: dict[str, dict] = {}
        self._client = serve_private_api.serve_start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(
        self,
        name: str,
        route_prefix: str,
        config_file: str = "configs/local.yaml",
        args: dict | None = None,
        deployments: dict[str, dict] | None = None,
        timeout_s: float = 120,
        wait: bool = True,
    ) -> str:
        """Deploy the first app of `config_file` as `name` at `route_prefix`; return its base URL."""
        app = copy.deepcopy(load_config(config_file)["applications"][0])
        app.update(name=name, route_prefix=route_prefix)
        app["args"] = merged_args(app.get("args", {}), args or {})
        status_server = app["args"].get("status_server", {})
        if status_server.get("port") and "port" not in (args or {}).get("status_server", {}):
            status_server["port"] = free_port()  # the config's port would be every test app's
        for deployment in app.get("deployments", []):
            deployment.update((deployments or {}).get(deployment["name"], {}))
        self._apps[name] = app
        self._client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(self._apps.values())}))
        if wait:
            self.wait_running(name, timeout_s)
        return self.base_url + route_prefix.rstrip("/")

    def remove(self, name: str) -> None:
        self._apps.pop(name, None)
        self._client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(self._apps.values())}))

    def wait_running(self, name: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = serve.status().applications.get(name)
            if app is not None and app.status == "RUNNING":
                return
            if app is not None and app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"{name} failed to deploy: {app.message}")
            time.sleep(0.5)
        raise TimeoutError(f"{name} did not reach RUNNING in {timeout_s} s")


def sdxl_stats(app_name: str, timeout_s: float = 60) -> dict:
    """The SDXL replica's counters once its pipeline is idle.

    Serve counts a cancelled request as finished as soon as it delivers the cancellation, while
    the pipeline thread may still be finishing its step; so wait for `busy` to clear.
    """
    handle = serve.get_deployment_handle("SDXLDeployment", app_name)
    deadline = time.monotonic() + timeout_s
    # On a thread of its own: callers may run an asyncio loop (Playwright), where `.result()` refuses.
    with ThreadPoolExecutor(1) as thread:
        while (stats := thread.submit(handle.stats.remote().result, timeout_s=timeout_s).result())["busy"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    return stats


@dataclass
class StreamedEvent:
    event: str
    data: dict


def stream_events(client: httpx.Client, url: str, body: dict, **kwargs) -> Iterator[StreamedEvent]:
    """POST `body` to `url` and yield its SSE events as parsed JSON, as fal clients see them.

    A failed stream ends with an `error` event and then a cut-off body (so that fal clients raise);
    the cut after an error event ends the iteration, anywhere else it raises.
    """
    last = None
    with connect_sse(client, "POST", url, json=body, **kwargs) as source:
        source.response.raise_for_status()
        try:
            for sse in source.iter_sse():
                last = StreamedEvent(event=sse.event, data=json.loads(sse.data))
                yield last
        except httpx.RemoteProtocolError:
            if last is None or last.event != "error":
                raise


def read_stream_body(response: httpx.Response) -> tuple[str, bool]:
    """A streamed response's body as received, and whether it was cut off (a failed stream)."""
    chunks = []
    try:
        for chunk in response.iter_raw():
            chunks.append(chunk)
    except httpx.RemoteProtocolError:
        return b"".join(chunks).decode(), True
    return b"".join(chunks).decode(), False


def decode_image(file: dict) -> Image.Image:
    """Decode a fal image file (data URI) and check it is what its `content_type` says."""
    header, payload = file["url"].split(",", 1)
    assert header == f"data:{file['content_type']};base64"
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    assert Image.MIME[image.format] == file["content_type"]
    return image
