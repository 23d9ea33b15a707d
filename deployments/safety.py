"""The safety checker, run as diffusers' Stable Diffusion pipelines run it, after the SDXL pipeline.

SDXL's pipeline has no safety checker of its own; fal's fast-sdxl runs one. This is diffusers'
`StableDiffusionSafetyChecker` (CLIP ViT image embeddings against concept embeddings) with its CLIP
image processor's settings: a flagged image is replaced by a black one and reported per image. Loaded
by `deployments.models.load_models` when the config names one (`safety_checker`).

The processor's steps (resize the shortest edge, center crop, rescale, normalize) run here in torch on
the images' device, from the 8-bit images the run sends, rather than through PIL on the CPU: the GPU
does not wait for a round trip through host memory while the slot is held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor


@dataclass
class SafetyChecker:
    model: StableDiffusionSafetyChecker
    processor: CLIPImageProcessor

    def clip_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """The checker's input for 8-bit images ([N, 3, H, W], uint8, on any device), as its CLIP image
        processor makes it from the same images in PIL: bicubic resize (antialiased, rounded to 8 bits
        as PIL's is), center crop, rescale, normalize."""
        processor = self.processor
        images = pixels.float()
        if processor.do_resize:
            images = _resized(images, processor.size).clamp(0, 255).round()
        if processor.do_center_crop:
            images = _center_cropped(images, processor.crop_size["height"], processor.crop_size["width"])
        if processor.do_rescale:
            images = images * processor.rescale_factor
        if processor.do_normalize:
            mean = torch.tensor(processor.image_mean, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, device=images.device).view(1, -1, 1, 1)
            images = (images - mean) / std
        return images.to(device=self.model.device, dtype=self.model.dtype)

    def check(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """8-bit images ([N, 3, H, W]), flagged ones replaced by black (in place, as diffusers does), and
        one flag per image."""
        checked, flagged = self.model(images=pixels, clip_input=self.clip_input(pixels))
        return checked, [bool(flag) for flag in flagged]


def _resized(images: torch.Tensor, size: dict[str, int]) -> torch.Tensor:
    """transformers' resize: to `shortest_edge` keeping the aspect (the long side truncated, as it does),
    or to an exact height and width."""
    height, width = images.shape[-2:]
    if "shortest_edge" in size:
        short, long = sorted((height, width))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        target = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        target = (size["height"], size["width"])
    return torch.nn.functional.interpolate(images, size=target, mode="bicubic", antialias=True, align_corners=False)


def _center_cropped(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = max((images.shape[-2] - height) // 2, 0)
    left = max((images.shape[-1] - width) // 2, 0)
    return images[..., top : top + height, left : left + width]
