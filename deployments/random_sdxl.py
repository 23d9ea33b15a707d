"""`model: sdxl-random`: the full-size SDXL base architecture with random weights, for honest GPU timing.

Same shapes and compute as real SDXL (UNet 2.6B, both text encoders, VAE) and a full-size
TAESDXL-shaped decoder, built from the configs in `sdxl_architecture/` with no download. Random
weights make noise, not pictures: use it to measure, never to serve. Its VAE decodes in the
pipeline's dtype, as madebyollin/sdxl-vae-fp16-fix (same architecture, `force_upcast: false`) does
in the shipped GPU configs; random weights stay far inside float16's range (peaks of ~10^2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from deployments.tiny import byte_level_clip_tokenizer, sdxl_scheduler

ARCHITECTURE = Path(__file__).parent / "sdxl_architecture"


def _config(name: str) -> dict:
    return json.loads((ARCHITECTURE / f"{name}.json").read_text())


def build_components(device: torch.device | str = "cpu") -> dict[str, torch.nn.Module]:
    """The five networks, initialised on `device` (use "meta" to inspect shapes without memory)."""
    torch.manual_seed(0)
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel.from_config(_config("unet")),
            "vae": AutoencoderKL.from_config({**_config("vae"), "force_upcast": False}),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2"))),
            "preview_decoder": AutoencoderTiny.from_config(_config("preview_decoder")),
        }


def build_random_sdxl(device: torch.device, dtype: torch.dtype) -> tuple[StableDiffusionXLPipeline, AutoencoderTiny]:
    """Pipeline and preview decoder on `device` in `dtype`. The tokenizers are the tiny model's
    byte-level ones (SDXL's real vocabulary cannot be downloaded here); token ids stay in range."""
    components = build_components(device)
    decoder = components.pop("preview_decoder").to(dtype=dtype)
    pipeline = StableDiffusionXLPipeline(
        **components,
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
        scheduler=sdxl_scheduler(),
    )
    pipeline.to(dtype=dtype)
    for module in components.values():
        module.eval()  # as `from_pretrained` leaves them (the decoder: `load_models` does it)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the float32 originals: ~14 GB the allocator would otherwise keep
    return pipeline, decoder
