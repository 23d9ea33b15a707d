"""Bad requests get a clear 4xx JSON error naming the problem, never a 5xx or a hang."""

from __future__ import annotations

import json

import httpx
import pytest

VALID = {"prompt": "a red fox", "num_inference_steps": 2, "width": 256, "height": 256}


def body(**changes) -> bytes:
    merged = {**VALID, **changes}
    return json.dumps({key: value for key, value in merged.items() if value is not ...}).encode()


# (case id, raw body, expected status, field the error must name or None)
CASES = [
    ("empty body", b"", 422, None),
    ("not json", b"prompt=a fox", 422, None),
    ("truncated json", b'{"prompt": "a fox"', 422, None),
    ("json array", b"[1, 2]", 422, None),
    ("json string", b'"a fox"', 422, None),
    ("json null", b"null", 422, None),
    ("missing prompt", body(prompt=...), 422, "prompt"),
    ("empty prompt", body(prompt=""), 422, "prompt"),
    ("whitespace prompt", body(prompt="  \n\t"), 422, "prompt"),
    ("prompt not a string", body(prompt=42), 422, "prompt"),
    ("prompt a list", body(prompt=["a", "fox"]), 422, "prompt"),
    ("over-long prompt", body(prompt="fox " * 1000), 422, "prompt"),
    ("over-long negative prompt", body(negative_prompt="x" * 5000), 422, "negative_prompt"),
    ("lone surrogate in prompt", b'{"prompt": "a \\ud800 fox"}', 422, "prompt"),
    ("steps zero", body(num_inference_steps=0), 422, "num_inference_steps"),
    ("steps too many", body(num_inference_steps=51), 422, "num_inference_steps"),
    ("steps as string", body(num_inference_steps="20"), 422, "num_inference_steps"),
    ("steps as float", body(num_inference_steps=20.5), 422, "num_inference_steps"),
    ("steps as bool", body(num_inference_steps=True), 422, "num_inference_steps"),
    ("steps huge", body(num_inference_steps=10**30), 422, "num_inference_steps"),
    ("width not multiple of 8", body(width=500), 422, "width"),
    ("height negative", body(height=-512), 422, "height"),
    ("width too large", body(width=4096), 422, "width"),
    ("height too small", body(height=64), 422, "height"),
    ("width null", body(width=None), 422, "width"),
    ("seed negative", body(seed=-1), 422, "seed"),
    ("seed huge", body(seed=2**64), 422, "seed"),
    ("seed as string", body(seed="42"), 422, "seed"),
    ("guidance NaN", b'{"prompt": "a fox", "guidance_scale": NaN}', 422, "guidance_scale"),
    ("guidance Infinity", b'{"prompt": "a fox", "guidance_scale": Infinity}', 422, "guidance_scale"),
    ("guidance negative", body(guidance_scale=-1.0), 422, "guidance_scale"),
    ("preview interval zero", body(preview_interval=0), 422, "preview_interval"),
    ("unknown output format", body(output_format="gif"), 422, "output_format"),
    ("unknown field", body(num_steps=20), 422, "num_steps"),
]


@pytest.mark.parametrize("path", ["/stream", "/"])
@pytest.mark.parametrize(("raw", "status", "field"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_request_gets_json_4xx_naming_the_field(
    local_url: str, client: httpx.Client, path: str, raw: bytes, status: int, field: str | None
) -> None:
    response = client.post(f"{local_url}{path}", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["error_type"] == "validation_error"
    if field is not None:
        assert any(field in item["loc"] for item in error["detail"]), error


def test_unicode_prompt_is_accepted(local_url: str, client: httpx.Client) -> None:
    prompt = "un renard roux 🦊, 狐狸, \u200b zero-width"
    response = client.post(f"{local_url}/", json={**VALID, "prompt": prompt})
    assert response.status_code == 200
    assert response.json()["prompt"] == prompt


def test_oversized_body_is_413(local_url: str, client: httpx.Client) -> None:
    raw = json.dumps({**VALID, "padding": "x" * (2 * 1024 * 1024)}).encode()
    response = client.post(f"{local_url}/stream", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error_type"] == "request_too_large"


@pytest.mark.parametrize(
    ("method", "path", "status", "error_type"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/stream", 405, "method_not_allowed"),
        ("PUT", "/", 405, "method_not_allowed"),
    ],
)
def test_unknown_route_or_method_is_json(
    local_url: str, client: httpx.Client, method: str, path: str, status: int, error_type: str
) -> None:
    response = client.request(method, f"{local_url}{path}")
    assert response.status_code == status
    assert response.json()["error_type"] == error_type
