"""Image to image and inpainting on the engine (the tiny model, in-process): one set of weights for all
three pipelines, the steps really run counted, previews as for text to image, and the same seed and
inputs giving the same image."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from deployments.engine import SDXLEngine
from serve_app.config import AppConfig
from serve_app.contract.events import RunMode
from serve_app.contract.requests import GenerationRequest, ImageToImageRequest, InpaintingRequest, ResolvedRequest
from tests.tiny_engine import collect, tiny_engine

POLICY = AppConfig().request_policy()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = png(Image.radial_gradient("L").convert("RGB").resize((160, 128)))
WHITE_MASK, BLACK_MASK = png(Image.new("L", (80, 64), 255)), png(Image.new("L", (160, 128), 0))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SDXLEngine:
    return tiny_engine(tmp_path_factory.mktemp("cache"))


def image_to_image(**fields: object) -> ResolvedRequest:
    body = ImageToImageRequest(**{"prompt": "a fox", "image_url": "-", "num_inference_steps": 10, "seed": 3, **fields})
    return POLICY.resolve(body, (160, 128), image=IMAGE)


def inpainting(mask: bytes, **fields: object) -> ResolvedRequest:
    body = InpaintingRequest(
        **{"prompt": "a fox", "image_url": "-", "mask_url": "-", "num_inference_steps": 10, "seed": 3, **fields}
    )
    return POLICY.resolve(body, (160, 128), image=IMAGE, mask=mask)


def pixels(event: dict) -> np.ndarray:
    data = base64.b64decode(event["image"]["url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def test_the_image_pipelines_share_the_text_pipelines_weights(engine: SDXLEngine) -> None:
    models = engine.models
    for pipeline in (models.image_to_image, models.inpainting):
        assert pipeline.unet is models.pipeline.unet and pipeline.vae is models.pipeline.vae
        assert pipeline.text_encoder_2 is models.pipeline.text_encoder_2


def test_progress_counts_the_steps_really_run(engine: SDXLEngine) -> None:
    events = collect(
        engine, image_to_image(strength=0.5, preview_interval=2), mode=RunMode(previews=True, progress=True)
    )
    progress = [(event["step"], event["num_inference_steps"]) for event in events if event["type"] == "progress"]
    assert progress == [(step, 5) for step in range(5)]  # 0.5 x 10
    assert [event["step"] for event in events if event["type"] == "preview"] == [0, 2, 4]
    final = events[-1]
    assert (final["image"]["width"], final["image"]["height"]) == (160, 128)


def test_the_same_seed_and_inputs_give_the_same_image_and_strength_matters(engine: SDXLEngine) -> None:
    first = pixels(collect(engine, image_to_image(), previews=False)[-1])
    again = pixels(collect(engine, image_to_image(), previews=False)[-1])
    weaker = pixels(collect(engine, image_to_image(strength=0.3), previews=False)[-1])
    assert np.array_equal(first, again)
    assert np.abs(first - weaker).mean() > 1.0


def test_inpainting_repaints_where_the_mask_is_white(engine: SDXLEngine) -> None:
    """A mask of another size is resized to the image's; white repaints, so an all-white mask and an
    all-black one give different images, and the same mask and seed the same one."""
    white = collect(engine, inpainting(WHITE_MASK), previews=False)[-1]
    assert white["type"] == "final" and (white["image"]["width"], white["image"]["height"]) == (160, 128)
    black = collect(engine, inpainting(BLACK_MASK), previews=False)[-1]
    assert np.abs(pixels(white) - pixels(black)).mean() > 1.0
    assert np.array_equal(pixels(white), pixels(collect(engine, inpainting(WHITE_MASK), previews=False)[-1]))


def test_text_to_image_is_unchanged_by_image_requests_in_between(engine: SDXLEngine) -> None:
    text = POLICY.resolve(GenerationRequest(prompt="a fox", num_inference_steps=3, width=128, height=128, seed=9))
    before = pixels(collect(engine, text, previews=False)[-1])
    collect(engine, inpainting(WHITE_MASK), previews=False)
    collect(engine, image_to_image(), previews=False)
    assert np.array_equal(before, pixels(collect(engine, text, previews=False)[-1]))
