"""The ingress deployment: the HTTP app in front of the model and the job queue.

No torch here: this replica only speaks HTTP. Its FastAPI app is built from the config by
`serve_app.http.app.build_http_app` when the replica starts; generations go through the injected
generation client (the Serve client over the SDXL deployment's handle by default).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.contract.errors import NotReady
from serve_app.generation.serve import ServeGenerationClient
from serve_app.http.app import build_http_app
from serve_app.http.errors import error_response
from serve_app.http.metrics import IngressMetrics
from serve_app.http.middleware import ApiKeys, ClientLedger
from serve_app.http.queue_api import QueueApi
from serve_app.http.relay import GenerationRelay
from serve_app.http.routes import route_table
from serve_app.http.status_server import StatusServer
from serve_app.queue.outputs import OutputStore


@serve.deployment
@serve.ingress()
class SDXLIngress:
    async def __init__(
        self,
        sdxl: DeploymentHandle,
        job_queue: DeploymentHandle,
        config: AppConfig,
        generation_client_cls: type = ServeGenerationClient,
    ) -> None:
        self._generation = generation_client_cls(sdxl)
        metrics = IngressMetrics()
        relay = GenerationRelay(
            self._generation,
            config.requests,
            config.http,
            on_rejection=lambda reason: metrics.rejections.inc(tags={"reason": reason}),
        )
        queue_api = QueueApi(job_queue, config, ApiKeys.from_env(config.http.api_keys_env))
        if config.http.max_generations_per_client is not None:
            queue_api.ledger = ClientLedger(queue_api.in_flight)
        routes = route_table(config.app_id)
        # The outputs' object store: image inputs read results and uploads from it, and uploads land in it.
        outputs = OutputStore.open(config.queue)
        self._app = build_http_app(config, routes, relay, queue_api, self.health, outputs)
        self._status_server: StatusServer | None = None
        if config.status_server.port is not None:
            self._status_server = StatusServer(self._app, routes, config.status_server.host, config.status_server.port)
            self._status_server.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    def __del__(self) -> None:
        status_server = getattr(self, "_status_server", None)  # None if __init__ failed before it
        if status_server is not None:
            status_server.stop()

    async def health(self) -> Response:
        """200 once a model replica runs. From a cached answer: asking the controller costs ~30 ms of CPU,
        which a load balancer's polls must not pay each time."""
        ready = await self._generation.ready_replicas() > 0
        return JSONResponse({"status": "ok"}) if ready else error_response(NotReady())
