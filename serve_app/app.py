"""The builder that `serve_config.yaml` and `configs/*.yaml` import via `import_path`."""

from __future__ import annotations

from ray.serve import Application

from deployments.sdxl import SDXLDeployment
from serve_app.config import AppConfig
from serve_app.ingress import SDXLIngress


def build_app(args: dict) -> Application:
    """Validate `args` into an `AppConfig` and bind the ingress to the SDXL deployment."""
    config = AppConfig.model_validate(args or {})
    return SDXLIngress.bind(SDXLDeployment.bind(config), config)
