"""The safety checker, run as diffusers' Stable Diffusion pipelines run it, after the SDXL pipeline.

SDXL's pipeline has no safety checker of its own; fal's fast-sdxl runs one. This is diffusers'
`StableDiffusionSafetyChecker` (CLIP ViT image embeddings against concept embeddings) with its CLIP
image processor: a flagged image is replaced by a black one and reported per image. Loaded by
`deployments.models.load_models` when the config names one (`safety_checker`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor


@dataclass
class SafetyChecker:
    model: StableDiffusionSafetyChecker
    processor: CLIPImageProcessor

    def clip_input(self, images: torch.Tensor) -> torch.Tensor:
        """The checker's input for pipeline images ([N, 3, H, W] in [0, 1]): as 8-bit images, through the
        CLIP processor (resize, center crop, normalize), as diffusers' `run_safety_checker` feeds it."""
        pil_images = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
        pixels = self.processor(pil_images, return_tensors="pt").pixel_values
        return pixels.to(device=self.model.device, dtype=self.model.dtype)

    def check(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Pipeline images ([N, 3, H, W] in [0, 1]), flagged ones replaced by black (in place, as diffusers
        does), and one flag per image."""
        checked, flagged = self.model(images=images, clip_input=self.clip_input(images))
        return checked, [bool(flag) for flag in flagged]
