"""Preview throttling, TAESD decoding and image encoding: small pure pieces the run composes."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from serve_app.contract.events import ImageFile

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


@dataclass(frozen=True)
class PreviewSchedule:
    """Which denoising steps (0-based, counted after the step ran) get a preview.

    Every `interval` steps starting with step 0, as in fal's example; `interval=0` means none.
    """

    interval: int

    def is_preview_step(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def steps(self, num_inference_steps: int) -> list[int]:
        return [step for step in range(num_inference_steps) if self.is_preview_step(step)]


LATENT_SCALE = 8  # pixels per latent, each way (SDXL's VAE and TAESD)


def preview_latents(latents: torch.Tensor, max_size: int | None) -> torch.Tensor:
    """The first image's latents, averaged down by the largest power of 2 that still decodes to at least
    `max_size` pixels on the long side: a 1024x1024 image's 512 px preview decodes a quarter of the pixels
    (and holds a quarter of the memory) that a full-size decode would, then throws away."""
    first = latents[:1]
    long_side = max(first.shape[-2:]) * LATENT_SCALE
    factor = 1
    while max_size is not None and long_side // (factor * 2) >= max_size:
        factor *= 2
    return torch.nn.functional.avg_pool2d(first, factor) if factor > 1 else first


def decode_latents(decoder: torch.nn.Module, latents: torch.Tensor, max_size: int | None = None) -> torch.Tensor:
    """Decode one image's latents with a TAESD-shaped decoder into uint8 HWC pixels, on its device: the
    first of a batch (`num_images`), whose previews show its first image, the final event's `image`;
    at no more resolution than a `max_size` preview needs (`preview_latents`).

    The conversion to uint8 happens there, so only a small tensor has to cross to the host.
    """
    scaled = preview_latents(latents, max_size).to(decoder.dtype) / decoder.config.scaling_factor
    scaled = scaled.contiguous(memory_format=torch.channels_last)  # as the decoder's weights are
    decoded = decoder.decode(scaled, return_dict=False)[0]  # in [-1, 1]
    pixels = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0)


def latents_to_pixels(decoder: torch.nn.Module, latents: torch.Tensor, max_size: int | None = None) -> torch.Tensor:
    """`decode_latents`, then on the CPU (a blocking copy when the decoder is on a GPU)."""
    return decode_latents(decoder, latents, max_size).cpu()


def final_pixels(images: torch.Tensor) -> torch.Tensor:
    """The pipeline's images ([N, 3, H, W] in [0, 1]) as 8-bit, on their device: converted once there, and
    rounded as diffusers' `numpy_to_pil` rounds, so a quarter of the bytes cross to the host."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)  # in float32, as diffusers rounds


def pixels_to_image(pixels: torch.Tensor, max_size: int) -> Image.Image:
    """A PIL image, downscaled (aspect kept) so its long side is at most `max_size`."""
    image = Image.fromarray(pixels.numpy())
    if max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    return image


def encode_image(image: Image.Image, image_format: Literal["jpeg", "png"], jpeg_quality: int) -> ImageFile:
    """The image as fal's file object: a base64 data URI with its content type and size."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, format="PNG")
    content_type = CONTENT_TYPES[image_format]
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return ImageFile(
        url=f"data:{content_type};base64,{data}", content_type=content_type, width=image.width, height=image.height
    )
