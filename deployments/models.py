"""Where the weights come from: a Hugging Face id, a local diffusers directory, or the tiny model.

All three go through `from_pretrained`, so the built-in tiny model exercises the real loading path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

from deployments.tiny import PREVIEW_DECODER_SUBDIR, default_cache_dir, ensure_tiny_model
from serve_app.config import TAESDXL, TINY_MODEL, AppConfig

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModels:
    pipeline: StableDiffusionXLPipeline
    preview_decoder: AutoencoderTiny
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_models(config: AppConfig) -> LoadedModels:
    """Load the SDXL pipeline and its preview decoder onto the configured device, once per replica."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    tiny_dir = _tiny_dir(config) if TINY_MODEL in (config.model, config.preview_decoder) else None

    pipeline = StableDiffusionXLPipeline.from_pretrained(
        _local_or_hub(config.model, tiny_dir), torch_dtype=dtype, **_hub_options(config.model, config, dtype)
    )
    if config.scheduler:
        scheduler_class = getattr(diffusers, config.scheduler)
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **config.scheduler_config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)

    decoder_source = config.preview_decoder or (TINY_MODEL if config.model == TINY_MODEL else TAESDXL)
    if decoder_source == TINY_MODEL:
        decoder = AutoencoderTiny.from_pretrained(tiny_dir / PREVIEW_DECODER_SUBDIR, torch_dtype=dtype)
    else:
        decoder = AutoencoderTiny.from_pretrained(
            decoder_source, torch_dtype=dtype, **_hub_options(decoder_source, config, dtype, variant=False)
        )
    decoder.to(device).eval()
    logger.info("Loaded %s (previews: %s) on %s as %s", config.model, decoder_source, device, dtype)
    return LoadedModels(pipeline=pipeline, preview_decoder=decoder, device=device, dtype=dtype)


def _tiny_dir(config: AppConfig) -> Path:
    cache = Path(config.cache_dir) / default_cache_dir().name if config.cache_dir else None
    return ensure_tiny_model(cache)


def _local_or_hub(source: str, tiny_dir: Path | None) -> str | Path:
    return tiny_dir if source == TINY_MODEL else source


def _hub_options(source: str, config: AppConfig, dtype: torch.dtype, variant: bool = True) -> dict:
    """`from_pretrained` options that only make sense for a hub id (a local directory is used as is)."""
    if source == TINY_MODEL or Path(source).is_dir():
        return {}
    options: dict = {"cache_dir": config.cache_dir}
    chosen_variant = config.variant or ("fp16" if dtype == torch.float16 else None)
    if variant and chosen_variant:
        options["variant"] = chosen_variant
    return options
