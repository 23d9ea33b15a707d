"""Where the weights come from: a Hugging Face id, a local diffusers directory, or the tiny model.

All three go through `from_pretrained`, so the built-in tiny model exercises the real loading path;
so does the optional safety checker (`safety_checker`: a hub id, a directory, or the tiny stand-in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor

from deployments.random_sdxl import build_random_sdxl
from deployments.safety import SafetyChecker
from deployments.speedups import compile_pipeline, fuse_qkv, quantize_unet, use_compile_cache
from deployments.tasks import image_pipelines
from deployments.tiny import PREVIEW_DECODER_SUBDIR, default_cache_dir, ensure_tiny_model, ensure_tiny_safety_checker
from serve_app.config import NO_SAFETY_CHECKER, RANDOM_SDXL, TAESDXL, TINY_MODEL, ModelConfig, PreviewConfig
from serve_app.contract.requests import Task

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModels:
    pipeline: StableDiffusionXLPipeline
    preview_decoder: AutoencoderTiny
    device: torch.device
    dtype: torch.dtype
    safety_checker: SafetyChecker | None = None  # None: nothing is checked
    image_to_image: StableDiffusionXLImg2ImgPipeline = field(init=False)  # the text pipeline's modules, shared
    inpainting: StableDiffusionXLInpaintPipeline = field(init=False)

    def __post_init__(self) -> None:
        self.image_to_image, self.inpainting = image_pipelines(self.pipeline)

    def for_task(self, task: Task) -> DiffusionPipeline:
        return {"text-to-image": self.pipeline, "image-to-image": self.image_to_image, "inpainting": self.inpainting}[
            task
        ]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_models(config: ModelConfig, previews: PreviewConfig) -> LoadedModels:
    """Load the SDXL pipeline and its preview decoder onto the configured device, once per replica."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if config.source == RANDOM_SDXL:
        pipeline, decoder = build_random_sdxl(device, dtype)
    else:
        pipeline, decoder = _load_pretrained(config, previews.decoder, dtype)
    if config.scheduler:
        scheduler_class = getattr(diffusers, config.scheduler)
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **config.scheduler_config)
    pipeline.set_progress_bar_config(disable=True)
    # A batch (`num_images`) decodes one image at a time: the VAE's peak memory stays one image's, and
    # image i of a batch decodes exactly as a single image does. A single image is unaffected.
    pipeline.vae.enable_slicing()
    pipeline.to(device)
    # Channels-last convolutions on every device: a preview's decode runs in the denoising loop on a CPU,
    # where it measured 23% faster (benchmarks/results/overhead.md), and on a side stream on CUDA.
    decoder.to(device, memory_format=torch.channels_last).eval()
    safety_checker = _load_safety_checker(config, dtype)
    if safety_checker is not None:
        safety_checker.model.to(device)
    if config.fuse_qkv:
        fuse_qkv(pipeline)
    if config.quantization != "none":
        quantize_unet(pipeline, config.quantization, device)
    if device.type == "cuda":
        _optimize_for_cuda(pipeline, config)
    logger.info("Loaded %s on %s as %s", config.source, device, dtype)
    return LoadedModels(
        pipeline=pipeline, preview_decoder=decoder, device=device, dtype=dtype, safety_checker=safety_checker
    )


def _load_pretrained(
    config: ModelConfig, preview_decoder: str | None, dtype: torch.dtype
) -> tuple[StableDiffusionXLPipeline, AutoencoderTiny]:
    tiny_dir = _tiny_dir(config) if TINY_MODEL in (config.source, preview_decoder) else None
    overrides = {}
    if config.vae:
        overrides["vae"] = AutoencoderKL.from_pretrained(
            config.vae, torch_dtype=dtype, **_hub_options(config.vae, config, dtype, variant=False)
        )
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        _local_or_hub(config.source, tiny_dir),
        torch_dtype=dtype,
        **overrides,
        **_hub_options(config.source, config, dtype),
    )
    decoder_source = preview_decoder or (TINY_MODEL if config.source == TINY_MODEL else TAESDXL)
    if decoder_source == TINY_MODEL:
        decoder = AutoencoderTiny.from_pretrained(tiny_dir / PREVIEW_DECODER_SUBDIR, torch_dtype=dtype)
    else:
        decoder = AutoencoderTiny.from_pretrained(
            decoder_source, torch_dtype=dtype, **_hub_options(decoder_source, config, dtype, variant=False)
        )
    return pipeline, decoder


def _load_safety_checker(config: ModelConfig, dtype: torch.dtype) -> SafetyChecker | None:
    """diffusers' safety checker and its CLIP image processor, from the same place (as in
    CompVis/stable-diffusion-safety-checker); None when the config names none."""
    if config.safety_checker == NO_SAFETY_CHECKER:
        return None
    if config.safety_checker == TINY_MODEL:
        source: str | Path = ensure_tiny_safety_checker(_tiny_dir(config))
        options = {}
    else:
        source = config.safety_checker
        options = _hub_options(config.safety_checker, config, dtype, variant=False)
    model = StableDiffusionSafetyChecker.from_pretrained(source, torch_dtype=dtype, **options)
    processor = CLIPImageProcessor.from_pretrained(source, **options)
    return SafetyChecker(model=model.eval(), processor=processor)


def _optimize_for_cuda(pipeline: StableDiffusionXLPipeline, config: ModelConfig) -> None:
    """Channels-last convolutions (diffusers already uses SDPA attention); optionally compiled graphs."""
    for module in (pipeline.unet, pipeline.vae):
        module.to(memory_format=torch.channels_last)
    if pipeline.vae.config.force_upcast and pipeline.vae.dtype == torch.float16:
        logger.warning(
            "This VAE upcasts to float32 for every decode (its config says force_upcast): slower, and it converts "
            "its weights twice per request; set `vae: madebyollin/sdxl-vae-fp16-fix` to decode in float16"
        )
    if config.compile:
        if config.compile_cache_dir:
            use_compile_cache(config.compile_cache_dir)
        compile_pipeline(pipeline, mode=config.compile_mode)


def _tiny_dir(config: ModelConfig) -> Path:
    cache = Path(config.cache_dir) / default_cache_dir().name if config.cache_dir else None
    return ensure_tiny_model(cache)


def _local_or_hub(source: str, tiny_dir: Path | None) -> str | Path:
    return tiny_dir if source == TINY_MODEL else source


def _hub_options(source: str, config: ModelConfig, dtype: torch.dtype, variant: bool = True) -> dict:
    """`from_pretrained` options that only make sense for a hub id (a local directory is used as is)."""
    if source == TINY_MODEL or Path(source).is_dir():
        return {}
    options: dict = {"cache_dir": config.cache_dir}
    chosen_variant = config.variant or ("fp16" if dtype == torch.float16 else None)
    if variant and chosen_variant:
        options["variant"] = chosen_variant
    return options
