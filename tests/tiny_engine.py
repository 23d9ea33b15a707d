"""The tiny model's engine in-process, for the unit tests: configs in sections, requests resolved as the
HTTP app resolves them, and a run's events read as a client sees them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deployments.engine import EngineConfig, SDXLEngine
from serve_app.config import AppConfig
from serve_app.contract.errors import ServiceError
from serve_app.contract.events import RESULT_ONLY, STREAM, RunMode
from serve_app.contract.requests import GenerationRequest, ResolvedRequest


def tiny_config(cache: Path | str | None = None, **sections: dict) -> AppConfig:
    """The tiny model on the CPU, with `sections` merged over it (e.g. `model={"warmup_size": 128}`)."""
    model = {"source": "tiny", "device": "cpu", **({"cache_dir": str(cache)} if cache else {})}
    return AppConfig.model_validate({**sections, "model": {**model, **sections.get("model", {})}})


def tiny_engine(cache: Path | str | None = None, **sections: dict) -> SDXLEngine:
    return SDXLEngine(EngineConfig.of(tiny_config(cache, **sections)))


def resolved(config: AppConfig | None = None, **fields: object) -> ResolvedRequest:
    """A request as the HTTP app hands it to the engine: `fields` with the config's defaults resolved."""
    return (config or AppConfig()).request_policy().resolve(GenerationRequest(**{"prompt": "a red fox", **fields}))


def collect(
    engine: SDXLEngine, request: ResolvedRequest, previews: bool = True, mode: RunMode | None = None
) -> list[dict]:
    """The run's events as dicts; a failure as a last `{"type": "error", "detail", "error_type"}`, as
    the replica reports it. `mode`, when given, replaces `previews`."""
    mode = mode or (STREAM if previews else RESULT_ONLY)

    async def run() -> list[dict]:
        events = []
        try:
            async for event in engine.generate(request, mode):
                events.append(event.model_dump())
        except ServiceError as error:
            events.append({"type": "error", **error.body().model_dump()})
        return events

    return asyncio.run(run())
