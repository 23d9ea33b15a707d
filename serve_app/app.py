"""The builder that `serve_config.yaml` and `configs/*.yaml` import via `import_path`."""

from __future__ import annotations

from ray.serve import Application

from deployments.sdxl import SDXLDeployment
from serve_app.config import AppConfig
from serve_app.ingress import SDXLIngress
from serve_app.jobs.job_queue import JobQueue


def build_app(args: dict) -> Application:
    """Validate `args` into an `AppConfig`; bind the ingress to the SDXL deployment and the job queue."""
    config = AppConfig.model_validate(args or {})
    sdxl = SDXLDeployment.bind(config)
    return SDXLIngress.bind(sdxl, JobQueue.bind(sdxl, config), config)
