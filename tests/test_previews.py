from __future__ import annotations

import base64
import io

import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from deployments.previews import PreviewSchedule, encode_image, latents_to_pixels, pixels_to_image


@pytest.mark.parametrize(
    ("interval", "steps", "expected"),
    [
        (5, 20, [0, 5, 10, 15]),
        (5, 21, [0, 5, 10, 15, 20]),
        (5, 1, [0]),
        (1, 4, [0, 1, 2, 3]),
        (10, 4, [0]),
        (3, 7, [0, 3, 6]),
        (0, 20, []),  # previews off (POST /)
    ],
)
def test_schedule(interval: int, steps: int, expected: list[int]) -> None:
    schedule = PreviewSchedule(interval)
    assert schedule.steps(steps) == expected
    assert [schedule.is_preview_step(step) for step in range(steps)] == [step in expected for step in range(steps)]


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        ((512, 512), 512, (512, 512)),
        ((1024, 1024), 512, (512, 512)),
        ((1024, 512), 256, (256, 128)),
        ((64, 96), 512, (64, 96)),
    ],
)
def test_pixels_are_downscaled_keeping_aspect(size: tuple, max_size: int, expected: tuple) -> None:
    width, height = size
    pixels = torch.zeros((height, width, 3), dtype=torch.uint8)
    assert pixels_to_image(pixels, max_size).size == expected


@pytest.mark.parametrize(("image_format", "content_type"), [("jpeg", "image/jpeg"), ("png", "image/png")])
def test_encode_image_is_a_data_uri_fal_can_render(image_format: str, content_type: str) -> None:
    image = Image.new("RGB", (40, 24), (200, 10, 10))
    file = encode_image(image, image_format, jpeg_quality=70)
    assert file.content_type == content_type
    assert (file.width, file.height) == (40, 24)
    prefix = f"data:{content_type};base64,"
    assert file.url.startswith(prefix)
    decoded = Image.open(io.BytesIO(base64.b64decode(file.url[len(prefix) :])))
    assert decoded.size == (40, 24)
    assert decoded.getpixel((20, 12))[0] > 150


def test_jpeg_quality_changes_size() -> None:
    image = Image.effect_noise((256, 256), 64).convert("RGB")
    assert len(encode_image(image, "jpeg", 95).url) > len(encode_image(image, "jpeg", 30).url)


def test_latents_decode_to_8x_pixels_in_uint8() -> None:
    torch.manual_seed(0)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    with torch.inference_mode():
        pixels = latents_to_pixels(decoder, torch.randn(2, 4, 8, 12))  # a CFG batch: only the first is shown
    assert pixels.shape == (64, 96, 3)
    assert pixels.dtype == torch.uint8
    assert pixels.device.type == "cpu"
