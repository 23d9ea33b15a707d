from __future__ import annotations

import base64
import io
import threading

import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from deployments.preview_worker import CpuPreviewWorker, PreviewRequest, PreviewSettings, start_preview_worker
from deployments.previews import PreviewSchedule, encode_image, latents_to_pixels, pixels_to_image
from serve_app.contract.events import PreviewEvent


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


def tiny_decoder() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def test_latents_decode_to_8x_pixels_in_uint8() -> None:
    decoder = tiny_decoder()
    with torch.inference_mode():
        pixels = latents_to_pixels(decoder, torch.randn(2, 4, 8, 12))  # a CFG batch: only the first is shown
    assert pixels.shape == (64, 96, 3)
    assert pixels.dtype == torch.uint8
    assert pixels.device.type == "cpu"


@pytest.mark.parametrize(
    ("latent_size", "max_size", "decoded"),
    [
        ((128, 128), 512, (512, 512)),  # a 1024x1024 image's 512 px preview: a quarter of the pixels decoded
        ((256, 192), 512, (512, 384)),  # 2048x1536: a sixteenth
        ((64, 64), 512, (512, 512)),  # 512x512: already the preview's size
        ((96, 64), 512, (768, 512)),  # 768x512: no power of 2 gets closer without going under
        ((128, 128), None, (1024, 1024)),  # no limit: full size
    ],
)
def test_previews_decode_at_the_size_they_are_shown(
    latent_size: tuple[int, int], max_size: int | None, decoded: tuple[int, int]
) -> None:
    with torch.inference_mode():
        pixels = latents_to_pixels(tiny_decoder(), torch.randn(1, 4, *latent_size), max_size)
    assert tuple(pixels.shape[:2]) == decoded


def test_cpu_worker_decodes_in_the_loop_and_encodes_on_its_own_thread() -> None:
    """On a CPU the decode runs in the caller (the denoising loop); only the encoding moves off it."""
    decoder = tiny_decoder()
    worker = start_preview_worker(decoder, PreviewSettings(max_size=64, jpeg_quality=70))
    assert isinstance(worker, CpuPreviewWorker)
    decode, decode_threads, deliver_threads = decoder.decode, [], []

    def watched_decode(*args, **kwargs):
        decode_threads.append(threading.current_thread())
        return decode(*args, **kwargs)

    decoder.decode = watched_decode
    delivered: list[PreviewEvent] = []

    def deliver(event: PreviewEvent) -> None:
        deliver_threads.append(threading.current_thread())
        delivered.append(event)

    failures: list[BaseException] = []
    worker.submit(PreviewRequest(3, 20, torch.randn(1, 4, 8, 12), deliver, failures.append))
    worker.drain()
    assert decode_threads == [threading.current_thread()]
    assert [thread.name for thread in deliver_threads] == ["preview-encoder"]
    assert [(event.step, event.num_inference_steps, event.image.width) for event in delivered] == [(3, 20, 64)]
    assert failures == []


def test_a_failed_preview_decode_reaches_the_run_as_it_was_raised() -> None:
    """The run classifies the original exception (a CUDA error must stay a device error)."""
    decoder = tiny_decoder()
    worker = start_preview_worker(decoder, PreviewSettings(max_size=64, jpeg_quality=70))
    error = RuntimeError("CUDA error: an illegal memory access was encountered")

    def fail(*args, **kwargs):
        raise error

    decoder.decode = fail
    delivered: list[PreviewEvent] = []
    failures: list[BaseException] = []
    worker.submit(PreviewRequest(0, 4, torch.randn(1, 4, 8, 8), delivered.append, failures.append))
    worker.drain()
    assert failures == [error] and delivered == []
