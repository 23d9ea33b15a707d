from __future__ import annotations

import json

from serve_app.contract.errors import GenerationFailed
from serve_app.contract.events import FinalEvent, ImageFile, PreviewEvent, Timings
from serve_app.http.sse import encode_event, error_event, keepalive_comment

IMAGE = ImageFile(url="data:image/jpeg;base64,AA==", content_type="image/jpeg", width=8, height=8)


def test_preview_and_final_are_plain_data_events() -> None:
    event = PreviewEvent(step=0, num_inference_steps=4, image=IMAGE)
    encoded = encode_event(event).encode().decode()
    assert encoded.startswith("data: ")
    assert encoded.endswith("\n\n")
    assert encoded.count("\n") == 2  # one data line, one blank line: fal's framing
    assert json.loads(encoded[len("data: ") :]) == event.model_dump()


def test_error_is_an_error_event_with_detail_and_type() -> None:
    encoded = error_event(GenerationFailed("boom\nsecond line"))
    lines = encoded.encode().decode().split("\n")
    assert lines[0] == "event: error"
    assert json.loads(lines[1][len("data: ") :]) == {"detail": "boom\nsecond line", "error_type": "generation_failed"}
    assert lines[2:] == ["", ""]


def test_non_ascii_survives_as_utf8() -> None:
    final = FinalEvent(
        image=IMAGE,
        images=[IMAGE],
        seed=1,
        timings=Timings(inference=1, total=1),
        prompt="renard 🦊",
        has_nsfw_concepts=[None],
    )
    assert "🦊".encode() in encode_event(final).encode()


def test_keepalive_is_a_comment() -> None:
    assert keepalive_comment().encode() == b": keepalive\n\n"
