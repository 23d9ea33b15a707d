"""The job-queue deployment: a `JobDispatcher` over the configured store and the model deployment.

The generation client class is injected (as Ray Serve LLM injects its engine class): the Serve
client over the SDXL deployment's handle by default.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import QueueConfig
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.serve import ServeGenerationClient
from serve_app.queue import open_job_store
from serve_app.queue.dispatcher import JobDispatcher, Submitted
from serve_app.queue.feed import FeedChanges, JobSnapshot
from serve_app.queue.metrics import ServeQueueMetrics
from serve_app.queue.records import CancelOutcome, JobRecord


@serve.deployment
class JobQueue:
    async def __init__(
        self,
        sdxl: DeploymentHandle,
        config: QueueConfig,
        app_id: str,
        generation_client_cls: type = ServeGenerationClient,
    ) -> None:
        store = open_job_store(_redis_url(config), app_id=app_id, result_ttl_s=config.result_ttl_s)
        self._dispatcher = JobDispatcher(
            store, generation_client_cls(sdxl), config, app_id, metrics=ServeQueueMetrics()
        )
        await self._dispatcher.start()

    async def submit(self, request: ResolvedRequest, webhook_url: str | None) -> Submitted:
        return await self._dispatcher.submit(request, webhook_url)

    async def changes(self, epoch: str, since: int, timeout_s: float) -> FeedChanges:
        return await self._dispatcher.changes(epoch, since, timeout_s)

    async def snapshot(self, request_id: str) -> JobSnapshot | None:
        return await self._dispatcher.snapshot(request_id)

    async def result(self, request_id: str) -> JobRecord | None:
        return await self._dispatcher.result(request_id)

    async def file(self, key: str) -> tuple[bytes, str] | None:
        return await self._dispatcher.file(key)

    async def cancel(self, request_id: str) -> CancelOutcome:
        return await self._dispatcher.cancel(request_id)

    def stats(self) -> dict:
        return self._dispatcher.stats()


def _redis_url(config: QueueConfig) -> str | None:
    if config.store == "memory":
        return None
    url = os.environ.get(config.redis_url_env)
    if not url:
        raise ValueError(f"queue.store is 'redis' but the environment variable {config.redis_url_env} is not set")
    return url
