from __future__ import annotations

import json

from serve_app.sse import encode_event, is_terminal, keepalive_comment


def test_preview_and_final_are_plain_data_events() -> None:
    event = {
        "type": "preview",
        "step": 0,
        "image": {"url": "data:image/jpeg;base64,AA==", "content_type": "image/jpeg"},
    }
    encoded = encode_event(event).encode().decode()
    assert encoded.startswith("data: ")
    assert encoded.endswith("\n\n")
    assert encoded.count("\n") == 2  # one data line, one blank line: fal's framing
    assert json.loads(encoded[len("data: ") :]) == event


def test_error_is_an_error_event_with_detail_and_type() -> None:
    encoded = encode_event({"type": "error", "detail": "boom\nsecond line", "error_type": "generation_failed"})
    lines = encoded.encode().decode().split("\n")
    assert lines[0] == "event: error"
    assert json.loads(lines[1][len("data: ") :]) == {"detail": "boom\nsecond line", "error_type": "generation_failed"}
    assert lines[2:] == ["", ""]


def test_non_ascii_survives_as_utf8() -> None:
    encoded = encode_event({"type": "final", "prompt": "renard 🦊"}).encode()
    assert "🦊".encode() in encoded


def test_keepalive_is_a_comment() -> None:
    assert keepalive_comment().encode() == b": keepalive\n\n"


def test_terminal_events() -> None:
    assert is_terminal({"type": "final"})
    assert is_terminal({"type": "error"})
    assert not is_terminal({"type": "preview"})
