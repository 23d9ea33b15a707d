"""The builder that `serve_config.yaml` and `configs/*.yaml` import via `import_path`."""

from __future__ import annotations

from ray.serve import Application

from deployments.engine import EngineConfig
from deployments.sdxl import SDXLDeployment
from serve_app.config import AppConfig
from serve_app.http.ingress import SDXLIngress
from serve_app.queue.job_queue import JobQueue


def build_app(args: dict) -> Application:
    """Validate `args` into an `AppConfig`; bind each deployment to the sections it reads: the model
    replica to the model's, the job queue to the queue's, the ingress (which answers every route) to
    the rest."""
    config = AppConfig.model_validate(args or {})
    sdxl = SDXLDeployment.bind(EngineConfig.of(config))
    job_queue = JobQueue.bind(sdxl, config.queue, config.app_id)
    return SDXLIngress.bind(sdxl, job_queue, config)
