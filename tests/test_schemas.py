from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.contract.adapters import (
    AdapterPolicy,
    Embedding,
    LoraWeight,
    adapter_set_id,
    check_adapters,
    path_problem,
)
from serve_app.contract.errors import ValidationFailed
from serve_app.contract.events import GenerationResult
from serve_app.contract.requests import IMAGE_SIZE_PRESETS, MAX_SEED, GenerationRequest, ResolvedRequest


def test_defaults_match_fal_reference() -> None:
    request = GenerationRequest(prompt="a fox")
    assert request.negative_prompt == "blurry, low quality"
    assert request.num_inference_steps == 20
    assert (request.width, request.height) == (1024, 1024)
    assert request.seed is None
    assert request.output_format == "jpeg"
    assert request.preview_interval is None
    assert request.num_images == 1 and request.enable_safety_checker is True


@pytest.mark.parametrize(("preset", "size"), list(IMAGE_SIZE_PRESETS.items()))
def test_image_size_presets_are_fal_fast_sdxls(preset: str, size: tuple[int, int]) -> None:
    expected = {
        "square_hd": (1024, 1024),
        "square": (512, 512),
        "portrait_4_3": (768, 1024),
        "portrait_16_9": (576, 1024),
        "landscape_4_3": (1024, 768),
        "landscape_16_9": (1024, 576),
    }
    request = GenerationRequest.model_validate({"prompt": "a fox", "image_size": preset})
    assert (request.width, request.height) == size == expected[preset]
    assert request.image_size is None  # resolved: the request carries width and height only
    assert {"width", "height"} <= request.model_fields_set  # sent, so request defaults do not replace them


@pytest.mark.parametrize(
    ("image_size", "size"),
    [({"width": 256, "height": 384}, (256, 384)), ({"width": 256}, (256, 512)), ({}, (512, 512))],  # fal: 512 each
)
def test_image_size_object(image_size: dict, size: tuple[int, int]) -> None:
    request = GenerationRequest.model_validate({"prompt": "a fox", "image_size": image_size})
    assert (request.width, request.height) == size


def test_image_size_with_agreeing_width_and_height_is_fine() -> None:
    fields = {"prompt": "a fox", "image_size": "square", "width": 512, "height": 512}
    assert GenerationRequest.model_validate(fields).width == 512


def test_format_is_fals_name_of_output_format() -> None:
    request = GenerationRequest.model_validate({"prompt": "a fox", "format": "png"})
    assert (request.output_format, request.format) == ("png", None)
    assert "output_format" in request.model_fields_set
    assert GenerationRequest.model_validate({"prompt": "a fox", "format": "png", "output_format": "png"})


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": "abc", "safety_checker_version": "v2", "sync_mode": True, "enable_safety_checker": False},
        {"expand_prompt": False, "loras": [], "embeddings": []},
    ],
)
def test_accepts_fal_fields_it_does_not_act_on(fields: dict) -> None:
    GenerationRequest.model_validate({"prompt": "a fox", **fields})


@pytest.mark.parametrize(
    ("field", "value", "number"),
    [("seed", 42.0, 42), ("num_inference_steps", 20.0, 20), ("num_images", 4.0, 4), ("width", 512.0, 512)],
)
def test_integral_json_numbers_are_integers(field: str, value: float, number: int) -> None:
    """JSON has one number type: Python's json.dumps sends 42.0 for a float that is an integer."""
    request = GenerationRequest.model_validate({"prompt": "a fox", field: value})
    assert getattr(request, field) == number and type(getattr(request, field)) is int


@pytest.mark.parametrize(
    "fields",
    [
        {"num_inference_steps": 1},
        {"num_inference_steps": 50},
        {"width": 128, "height": 2048},
        {"seed": 0},
        {"seed": MAX_SEED},
        {"seed": float(MAX_SEED - 1)},
        {"num_images": 8},
        {"image_size": {"width": 128, "height": 2048}},
        {"guidance_scale": 0},  # an int where a float is expected is fine
        {"preview_interval": 50},
        {"output_format": "png"},
        {"negative_prompt": ""},
    ],
)
def test_accepts_values_at_the_bounds(fields: dict) -> None:
    GenerationRequest.model_validate({"prompt": "a fox", **fields})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": " "}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"negative_prompt": "\udfff"}, "negative_prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"num_inference_steps": "20"}, "num_inference_steps"),
        ({"num_inference_steps": 20.5}, "num_inference_steps"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"width": 1020}, "width"),
        ({"height": 120}, "height"),
        ({"width": 2056}, "width"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": 42.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": 1e300}, "seed"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 9}, "num_images"),
        ({"num_images": "4"}, "num_images"),
        ({"image_size": "square", "width": 1024}, "width"),
        ({"image_size": {"width": 256, "height": 256}, "height": 512}, "height"),
        ({"format": "png", "output_format": "jpeg"}, "output_format"),
        ({"format": "webp"}, "format"),
        ({"expand_prompt": True}, "expand_prompt"),
        ({"safety_checker_version": "v3"}, "safety_checker_version"),
        ({"enable_safety_checker": "yes"}, "enable_safety_checker"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"preview_interval": 0}, "preview_interval"),
        ({"output_format": "webp"}, "output_format"),
        ({"steps": 20}, "steps"),
    ],
)
def test_rejects_invalid_values_naming_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        GenerationRequest.model_validate({"prompt": "a fox", **fields})
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"expand_prompt": True}, "expand_prompt is not supported"),
        ({"image_size": "square", "width": 1024}, "width 1024 disagrees with image_size (512)"),
    ],
)
def test_unsupported_or_contradictory_fields_say_so(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        GenerationRequest.model_validate({"prompt": "a fox", **fields})


@pytest.mark.parametrize("image_size", ["huge", {"width": 250}, {"width": 512, "depth": 3}, 512])
def test_bad_image_size_names_it(image_size: object) -> None:
    with pytest.raises(ValidationError) as raised:
        GenerationRequest.model_validate({"prompt": "a fox", "image_size": image_size})
    assert all(error["loc"][0] == "image_size" for error in raised.value.errors())


def test_result_says_per_image_whether_a_check_ran() -> None:
    image = {"url": "data:image/png;base64,", "content_type": "image/png", "width": 8, "height": 8}
    result = {"images": [image, image], "seed": 1, "timings": {"inference": 1, "total": 1}, "prompt": "a fox"}
    assert GenerationResult.model_validate({**result, "has_nsfw_concepts": [None, None]})
    assert GenerationResult.model_validate({**result, "has_nsfw_concepts": [True, False]})
    with pytest.raises(ValidationError):
        GenerationResult.model_validate(result)  # never silently absent


@pytest.mark.parametrize(
    "fields",
    [{"seed": 3, "width": 512, "height": 768}, {"image_size": "portrait_16_9", "format": "png", "num_images": 3}],
)
def test_round_trips_as_a_dict_across_the_process_boundary(fields: dict) -> None:
    request = GenerationRequest.model_validate({"prompt": "a fox", **fields})
    assert GenerationRequest.model_validate(request.model_dump()) == request


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("style.safetensors", None),
        ("styles/fox.safetensors", None),
        ("owner/name", None),
        ("owner/name/dir/file.safetensors", None),
        ("https://adapters.example.com/a.safetensors", None),
        ("https://elsewhere.example.org/a.safetensors", "adapter_not_allowed"),
        ("https://adapters.example.com/a.ckpt", "adapter_not_safetensors"),
        ("owner/name/model.bin", "adapter_not_safetensors"),
        ("/etc/passwd", "adapter_not_allowed"),
        ("../outside.safetensors", "adapter_not_allowed"),
        ("dir/../../outside.safetensors", "adapter_not_allowed"),
        ("file:///etc/passwd", "adapter_not_allowed"),
        ("s3://bucket/a.safetensors", "adapter_not_allowed"),
        ("C:\\loras\\a.safetensors", "adapter_not_allowed"),
        ("~/a.safetensors", "adapter_not_allowed"),
        ("justaname", "adapter_not_allowed"),
    ],
)
def test_an_adapter_path_is_a_url_a_hugging_face_id_or_a_local_file_name(path: str, problem: str | None) -> None:
    policy = AdapterPolicy(url_hosts=(".example.com",))
    found = path_problem(path, policy)
    assert (found[0] if found else None) == problem


def test_adapter_limits_and_tokens_are_checked_at_the_ingress() -> None:
    policy = AdapterPolicy(max_loras=1, max_embeddings=1)
    two = [LoraWeight(path="a.safetensors"), LoraWeight(path="b.safetensors")]
    with pytest.raises(ValidationFailed) as raised:
        check_adapters(two, [], policy)
    assert raised.value.detail[0]["loc"] == ["body", "loras"] and "at most 1" in raised.value.detail[0]["msg"]
    with pytest.raises(ValidationFailed, match="validation_error"):
        check_adapters([], [Embedding(path="e.safetensors", tokens=["<x>", "<x>"])], policy)
    with pytest.raises(ValidationFailed) as raised:
        check_adapters([LoraWeight(path="a.safetensors")], [], AdapterPolicy(max_loras=0))
    assert "loads no loras" in raised.value.detail[0]["msg"]


def test_the_adapter_set_id_names_the_paths_not_the_scales() -> None:
    one = adapter_set_id((LoraWeight(path="a.safetensors", scale=0.5), LoraWeight(path="b.safetensors")), ())
    same = adapter_set_id((LoraWeight(path="b.safetensors", scale=2), LoraWeight(path="a.safetensors")), ())
    assert one == same and one.startswith("adapters-")
    assert adapter_set_id((LoraWeight(path="a.safetensors"),), ()) != one
    assert adapter_set_id((), (), runner_hint="session-1") != adapter_set_id((), (), runner_hint="session-2")
    assert adapter_set_id((), ()) == ""  # no adapters, no hint: any replica


def test_a_queued_jobs_adapters_survive_its_record() -> None:
    """The job store keeps a request as JSON; the dispatcher rebuilds it with the same adapters and routing id."""
    body = GenerationRequest(
        prompt="a fox", loras=[{"path": "a.safetensors", "scale": 2}], embeddings=[{"path": "e.safetensors"}]
    )
    resolved = AppConfig().request_policy().resolve(body, runner_hint="session-1")
    stored = json.loads(json.dumps(resolved.model_dump(exclude={"image", "mask"})))
    rebuilt = ResolvedRequest.model_validate(stored)
    assert rebuilt.loras == resolved.loras and rebuilt.embeddings == resolved.embeddings
    assert rebuilt.adapter_set_id == resolved.adapter_set_id != ""
