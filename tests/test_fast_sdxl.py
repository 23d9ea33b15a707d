"""fal fast-sdxl's request and response (issue 13) below HTTP: request profiles and limits in the config,
a batch as one pipeline call with per-image seeds, previews of a batch, and the safety checker."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file

from deployments.engine import SDXLEngine
from deployments.pipeline_run import batch_generators
from deployments.tiny import (
    TINY_CHECKER_FLAGS,
    default_cache_dir,
    ensure_tiny_model,
    ensure_tiny_safety_checker,
    write_tiny_safety_checker,
)
from serve_app.config import AppConfig
from serve_app.contract.errors import ValidationFailed
from serve_app.contract.requests import GenerationRequest
from tests import tiny_engine

REPO = Path(__file__).resolve().parents[1]
SMALL = {"prompt": "a red fox", "num_inference_steps": 3, "width": 128, "height": 128, "seed": 5}
# A batch whose image 2 has the seed (and everything else) of the image the tiny checker flags.
FLAGGED_BATCH = {**TINY_CHECKER_FLAGS, "seed": TINY_CHECKER_FLAGS["seed"] - 2, "num_images": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def engine(cache: Path) -> SDXLEngine:
    return tiny_engine.tiny_engine(cache, model={"safety_checker": "tiny"})


def collect(engine: SDXLEngine, fields: dict, previews: bool = False) -> list[dict]:
    return tiny_engine.collect(engine, tiny_engine.resolved(**fields), previews)


def pixels(file: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(file["url"].split(",", 1)[1]))).convert("RGB"))


# --- Request defaults and limits ---------------------------------------------------------------


def test_fast_sdxl_profile_gives_fals_defaults() -> None:
    config = AppConfig(requests={"profile": "fast-sdxl"})
    request = config.request_policy().resolve(GenerationRequest(prompt="a fox"))
    assert (request.num_inference_steps, request.guidance_scale, request.negative_prompt) == (25, 7.5, "")
    assert (request.width, request.height, request.output_format) == (1024, 1024, "jpeg")  # square_hd, jpeg


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ({"num_inference_steps": 4, "negative_prompt": "blur"}, {"num_inference_steps": 4, "negative_prompt": "blur"}),
        ({"image_size": "landscape_16_9"}, {"width": 1024, "height": 576}),
        ({"width": 256}, {"width": 256, "height": 512}),  # the other side from request_defaults' image_size
        ({"format": "jpeg"}, {"output_format": "jpeg"}),
    ],
)
def test_what_the_client_sends_wins_over_profile_and_defaults(sent: dict, expected: dict) -> None:
    config = AppConfig(requests={"profile": "fast-sdxl", "defaults": {"image_size": "square", "format": "png"}})
    assert config.requests.defaults == {"width": 512, "height": 512, "output_format": "png"}  # our names
    request = config.request_policy().resolve(GenerationRequest.model_validate({"prompt": "a fox", **sent}))
    assert {key: getattr(request, key) for key in expected} == expected


def test_default_profile_keeps_the_lighter_local_defaults() -> None:
    request = AppConfig().request_policy().resolve(GenerationRequest(prompt="a fox"))
    assert (request.num_inference_steps, request.negative_prompt) == (20, "blurry, low quality")


def test_num_images_over_the_deployments_cap_is_a_422_naming_it() -> None:
    policy = AppConfig(requests={"max_num_images": 2}).request_policy()
    assert policy.resolve(GenerationRequest(prompt="a fox", num_images=2)).num_images == 2
    with pytest.raises(ValidationFailed) as raised:
        policy.resolve(GenerationRequest(prompt="a fox", num_images=3))
    assert raised.value.status_code == 422
    assert raised.value.detail[0]["loc"] == ["body", "num_images"]
    with pytest.raises(ValueError, match="over max_num_images"):
        AppConfig(requests={"max_num_images": 2, "defaults": {"num_images": 4}})


def test_a_batch_past_max_batch_pixels_is_a_422_before_it_reaches_a_gpu() -> None:
    """width x height x num_images is what one kernel launch and the device's memory must hold: fal's
    8 images at 2048x2048 is refused by default (4 at that size, or 8 at 1024x1024, are served)."""
    policy = AppConfig().request_policy()
    large = {"image_size": {"width": 2048, "height": 2048}}
    assert policy.resolve(GenerationRequest(prompt="a fox", num_images=4, **large)).num_images == 4
    assert policy.resolve(GenerationRequest(prompt="a fox", num_images=8)).num_images == 8
    with pytest.raises(ValidationFailed) as raised:
        policy.resolve(GenerationRequest(prompt="a fox", num_images=5, **large))
    assert raised.value.status_code == 422 and "max_batch_pixels" in raised.value.detail[0]["msg"]
    with pytest.raises(ValueError, match="over max_batch_pixels"):
        AppConfig(requests={"max_batch_pixels": 512 * 512, "defaults": {"num_images": 2, "width": 512, "height": 512}})


def test_production_config_is_fal_fast_sdxl() -> None:
    app = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]
    config = AppConfig.model_validate(app["args"])
    assert (config.app_id, config.requests.profile) == ("fal-ai/fast-sdxl", "fast-sdxl")
    defaults = config.request_policy().resolve(GenerationRequest(prompt="check"))
    assert (defaults.width, defaults.height) in config.model.warmup_image_sizes()  # square_hd is warmed up


# --- One batched pipeline call, seeds, previews ---------------------------------------------------


def test_a_batch_is_one_pipeline_call(engine: SDXLEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, not timed: one pipeline call whose UNet sees the whole batch (x2 for guidance) each step."""
    pipeline_calls, unet_batches = [], []
    call, unet = StableDiffusionXLPipeline.__call__, engine.models.pipeline.unet
    forward = unet.forward

    def counted_call(pipeline, *args, **kwargs):
        pipeline_calls.append(1)
        return call(pipeline, *args, **kwargs)

    def counted_forward(sample, *args, **kwargs):
        unet_batches.append(len(sample))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", counted_call)
    monkeypatch.setattr(unet, "forward", counted_forward)

    (final,) = collect(engine, {**SMALL, "num_images": 4})
    assert pipeline_calls == [1]
    assert unet_batches == [8, 8, 8]  # 3 steps, 4 images, classifier-free guidance doubles the batch
    assert len(final["images"]) == 4 and final["image"] == final["images"][0]
    assert all((image["width"], image["height"]) == (128, 128) for image in final["images"])


def test_batch_generators_are_seeded_seed_plus_index_on_the_cpu_whatever_the_device() -> None:
    """CPU generators: diffusers draws the noise on them and moves it to the GPU, so a seed gives the
    same starting noise on a CPU and on every GPU model (a CUDA generator draws other numbers)."""
    generators = batch_generators(7, 3)
    assert [generator.initial_seed() for generator in generators] == [7, 8, 9]
    assert {generator.device.type for generator in generators} == {"cpu"}
    noise = randn_tensor((3, 4, 8, 8), generator=batch_generators(7, 3), device=torch.device("cpu"))
    again = torch.cat([randn_tensor((1, 4, 8, 8), generator=batch_generators(7 + i, 1)) for i in range(3)])
    assert torch.equal(noise, again)  # image i's noise is a single request's with seed 7 + i


def test_a_seed_reproduces_its_batch_and_image_i_is_seed_plus_i(engine: SDXLEngine) -> None:
    fields = {**SMALL, "num_images": 3, "output_format": "png"}
    first = collect(engine, fields)[-1]
    assert collect(engine, fields)[-1]["images"] == first["images"]  # bit for bit
    assert len({image["url"] for image in first["images"]}) == 3  # three different images
    for index, image in enumerate(first["images"]):
        single = collect(engine, {**fields, "num_images": 1, "seed": fields["seed"] + index})[-1]["images"][0]
        # The same starting noise; the batched UNet may round differently in the last bits.
        difference = np.abs(pixels(image).astype(int) - pixels(single).astype(int))
        assert difference.max() <= 1, index


def test_previews_of_a_batch_show_its_first_image(engine: SDXLEngine) -> None:
    fields = {**SMALL, "num_images": 3, "preview_interval": 1, "width": 256}
    *previews, final = collect(engine, fields, previews=True)
    alone = collect(engine, {**fields, "num_images": 1}, previews=True)[:-1]
    assert [preview["step"] for preview in previews] == [0, 1, 2]
    for preview, single in zip(previews, alone, strict=True):
        assert (preview["image"]["width"], preview["image"]["height"]) == (256, 128)  # one image, not a grid
        assert np.abs(pixels(preview["image"]).astype(int) - pixels(single["image"]).astype(int)).mean() < 1


# --- Safety checker ---------------------------------------------------------------------------


def test_tiny_checker_flags_the_image_it_is_built_to_flag_and_blacks_it_out(engine: SDXLEngine) -> None:
    final = collect(engine, FLAGGED_BATCH)[-1]
    assert final["has_nsfw_concepts"] == [False, False, True, False]
    assert pixels(final["images"][2]).max() == 0  # black, as diffusers replaces a flagged image
    assert all(pixels(final["images"][index]).std() > 5 for index in (0, 1, 3))


def test_a_check_turned_off_claims_nothing(engine: SDXLEngine) -> None:
    final = collect(engine, {**FLAGGED_BATCH, "enable_safety_checker": False})[-1]
    assert final["has_nsfw_concepts"] == [None] * 4
    assert pixels(final["images"][2]).std() > 5  # not blacked out


def test_without_a_checker_has_nsfw_concepts_is_null_per_image(cache: Path) -> None:
    engine = tiny_engine.tiny_engine(cache)
    assert engine.models.safety_checker is None
    assert collect(engine, {**FLAGGED_BATCH, "num_images": 3})[-1]["has_nsfw_concepts"] == [None] * 3


def test_tiny_checker_is_deterministic_and_loads_as_diffusers_checker(cache: Path, tmp_path: Path) -> None:
    model_dir = ensure_tiny_model(cache / default_cache_dir().name)  # the engines' model, as models.py finds it
    checker_dir = ensure_tiny_safety_checker(model_dir)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in checker_dir.iterdir()}
    write_tiny_safety_checker(tmp_path, model_dir)
    first, second = load_file(checker_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
