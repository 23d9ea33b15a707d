"""The job-queue deployment: a `JobDispatcher` over the configured store and the model deployment.

Several replicas share a Redis store (one feed, fenced claims, one outbox); with the in-process store
run one. The generation client class is injected (as Ray Serve LLM injects its engine class): the
Serve client over the SDXL deployment's handle by default.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import QueueConfig, cache_root
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.serve import ServeGenerationClient
from serve_app.queue import JobStore, StoreLimits, open_job_store
from serve_app.queue.dispatcher import JobDispatcher, Submitted
from serve_app.queue.metrics import ServeQueueMetrics
from serve_app.queue.outputs import KeepFor, OutputStore
from serve_app.queue.records import CancelOutcome, JobRecord
from serve_app.queue.signing import WebhookSigner, new_seed
from serve_app.queue.store import FeedChanges, JobSnapshot
from serve_app.queue.webhooks import WebhookSender


@serve.deployment
class JobQueue:
    async def __init__(
        self,
        sdxl: DeploymentHandle,
        config: QueueConfig,
        app_id: str,
        generation_client_cls: type = ServeGenerationClient,
    ) -> None:
        self._config = config
        store = open_job_store(_redis_url(config), app_id=app_id, limits=store_limits(config))
        signer, shared = await signing_key(config, store)
        self._dispatcher = JobDispatcher(
            store,
            generation_client_cls(sdxl),
            config,
            app_id,
            metrics=ServeQueueMetrics(),
            webhooks=WebhookSender(config.webhook_timeout_s, signer),
            shared_signing_key=shared,
            outputs=OutputStore.open(config),
        )
        await self._dispatcher.start()

    async def submit(
        self,
        request: ResolvedRequest,
        webhook_url: str | None,
        owner: str,
        priority: int = 0,
        start_timeout_s: float | None = None,
        base_url: str | None = None,
        keep_files: KeepFor = "default",
    ) -> Submitted:
        return await self._dispatcher.submit(
            request, webhook_url, owner, priority, start_timeout_s, base_url, keep_files
        )

    async def changes(self, epoch: str, since: int, queue_since: int, timeout_s: float) -> FeedChanges:
        return await self._dispatcher.changes(epoch, since, queue_since, timeout_s)

    async def previews(self, request_id: str, after: str, timeout_s: float) -> list[tuple[str, str]]:
        return await self._dispatcher.previews(request_id, after, timeout_s)

    async def snapshot(self, request_id: str) -> JobSnapshot | None:
        return await self._dispatcher.snapshot(request_id)

    async def audit(self, held: list[JobSnapshot]) -> list[JobSnapshot]:
        return await self._dispatcher.audit(held)

    async def result(self, request_id: str) -> JobRecord | None:
        return await self._dispatcher.result(request_id)

    async def file(self, key: str) -> tuple[bytes, str] | None:
        return await self._dispatcher.file(key)

    async def cancel(self, request_id: str, owner: str | None) -> CancelOutcome:
        return await self._dispatcher.cancel(request_id, owner)

    def stats(self) -> dict:
        return {"pid": os.getpid(), **self._dispatcher.stats()}

    def jwks(self) -> dict:
        return self._dispatcher.jwks()

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (a redeploy, a scale-down): the jobs it holds go back to
        the queue now rather than after their leases."""
        dispatcher = getattr(self, "_dispatcher", None)  # None if __init__ failed before it
        if dispatcher is not None:
            await dispatcher.close(handoff_wait_s=self._config.shutdown_handoff_s)


async def signing_key(config: QueueConfig, store: JobStore) -> tuple[WebhookSigner, str | None]:
    """The Secret's key; else one generated once and kept where every replica finds it: in Redis (then its
    seed, which the replica keeps there), or, for the in-process store (one replica), in a file beside the
    model cache."""
    signer = WebhookSigner.from_env(config.webhook_signing_key_env)
    if signer is not None:
        return signer, None
    if config.store == "redis":
        seed = await store.shared_signing_key(new_seed())
        return WebhookSigner.from_seed(seed), seed
    return WebhookSigner.kept_in_file(cache_root() / "webhook-signing-key"), None


def store_limits(config: QueueConfig) -> StoreLimits:
    return StoreLimits(
        result_ttl_s=config.result_ttl_s,
        max_finished_jobs=config.max_finished_jobs,
        max_finished_bytes=config.max_finished_bytes,
        max_finished_jobs_per_owner=config.max_finished_jobs_per_client,
        max_finished_bytes_per_owner=config.max_finished_bytes_per_client,
    )


def _redis_url(config: QueueConfig) -> str | None:
    if config.store == "memory":
        return None
    url = os.environ.get(config.redis_url_env)
    if not url:
        raise ValueError(f"queue.store is 'redis' but the environment variable {config.redis_url_env} is not set")
    return url
