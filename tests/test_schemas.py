from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.schemas import MAX_SEED, GenerationRequest


def test_defaults_match_fal_reference() -> None:
    request = GenerationRequest(prompt="a fox")
    assert request.negative_prompt == "blurry, low quality"
    assert request.num_inference_steps == 20
    assert (request.width, request.height) == (1024, 1024)
    assert request.seed is None
    assert request.output_format == "jpeg"
    assert request.preview_interval is None


@pytest.mark.parametrize(
    "fields",
    [
        {"num_inference_steps": 1},
        {"num_inference_steps": 50},
        {"width": 128, "height": 2048},
        {"seed": 0},
        {"seed": MAX_SEED},
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
        ({"num_inference_steps": 20.0}, "num_inference_steps"),
        ({"width": 1020}, "width"),
        ({"height": 120}, "height"),
        ({"width": 2056}, "width"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
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


def test_round_trips_as_a_dict_across_the_process_boundary() -> None:
    request = GenerationRequest(prompt="a fox", seed=3, width=512, height=768)
    assert GenerationRequest.model_validate(request.model_dump()) == request
