"""Which pipeline runs a request, and with what: text to image, image to image, inpainting.

The three pipelines are one set of weights: the image pipelines are built over the text one's modules
(shared, no second copy). An input image is decoded here from the bytes
the ingress checked, turned upright by its EXIF orientation, and resized to the request's size (the
input's own unless the client asked for another); a mask of another size is resized to it.
"""

from __future__ import annotations

import io
from typing import Any

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image, ImageOps

from serve_app.contract.requests import ResolvedRequest


def image_pipelines(
    pipeline: StableDiffusionXLPipeline,
) -> tuple[StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline]:
    """The image-to-image and inpainting pipelines over the text pipeline's modules, as diffusers'
    `from_pipe` makes them but without its cast of every shared module to one dtype (float32 unless told;
    it would turn a float16 UNet into a float32 one, and may not apply to a quantized one)."""
    options = {
        "force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt,
        "add_watermarker": getattr(pipeline, "watermark", None) is not None,
    }
    image_to_image = StableDiffusionXLImg2ImgPipeline(**pipeline.components, **options)
    inpainting = StableDiffusionXLInpaintPipeline(**pipeline.components, **options)
    for each in (image_to_image, inpainting):
        each.set_progress_bar_config(disable=True)
    return image_to_image, inpainting


def task_arguments(request: ResolvedRequest) -> dict[str, Any]:
    """The task's own pipeline arguments (the size for text to image; the image, mask and strength else)."""
    size = (request.width, request.height)
    if request.task == "text-to-image":
        return {"width": request.width, "height": request.height}
    arguments: dict[str, Any] = {"image": input_image(request.image, size, "RGB"), "strength": request.strength}
    if request.task == "inpainting":
        arguments.update(mask_image=input_image(request.mask, size, "L"), width=request.width, height=request.height)
    return arguments


def input_image(data: bytes | None, size: tuple[int, int], mode: str) -> Image.Image:
    if data is None:
        raise ValueError("an image task without its image")  # the ingress always attaches it
    with Image.open(io.BytesIO(data)) as opened:
        try:
            upright = ImageOps.exif_transpose(opened)
        except Exception:  # noqa: BLE001 - an unreadable EXIF block: the image as stored, as the ingress sized it
            upright = opened
        image = upright.convert(mode)
    if image.size != size:
        resample = Image.Resampling.LANCZOS if mode == "RGB" else Image.Resampling.BILINEAR
        image = image.resize(size, resample)
    return image
