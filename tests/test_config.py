"""The app's config in sections: each section validated on its own, request defaults resolved in one
place, and the flat keys of earlier releases still accepted, moved to their section with a warning."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from serve_app.config import LEGACY_KEYS, AppConfig
from serve_app.contract.requests import GenerationRequest


def test_flat_keys_of_earlier_releases_land_in_their_section_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        config = AppConfig.model_validate(
            {"model": "tiny", "device": "cpu", "job_store": "redis", "status_port": 8001, "preview_interval": 2}
        )
    assert (config.model.source, config.model.device) == ("tiny", "cpu")
    assert (config.queue.store, config.status_server.port, config.previews.interval) == ("redis", 8001, 2)
    assert "`job_store` is now `queue.store`" in caplog.text
    assert "`status_port` is now `status_server.port`" in caplog.text


def test_every_flat_key_has_a_real_place() -> None:
    for key, (section, field) in LEGACY_KEYS.items():
        assert field in type(getattr(AppConfig(), section)).model_fields, key


def test_flat_and_sectioned_keys_mix_but_never_twice() -> None:
    config = AppConfig.model_validate({"model": {"source": "tiny"}, "device": "cpu"})
    assert (config.model.source, config.model.device) == ("tiny", "cpu")
    with pytest.raises(ValidationError, match="given twice"):
        AppConfig.model_validate({"model": {"device": "cuda"}, "device": "cpu"})


def test_unknown_keys_are_refused_in_every_section() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        AppConfig.model_validate({"queue": {"stor": "redis"}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        AppConfig.model_validate({"no_such_knob": 1})


@pytest.mark.parametrize(
    ("args", "interval"),
    [
        ({}, 5),
        ({"previews": {"interval": 2}}, 2),
        ({"previews": {"interval": 2}, "requests": {"defaults": {"preview_interval": 3}}}, 3),
    ],
)
def test_the_preview_interval_default_is_resolved_once(args: dict, interval: int) -> None:
    policy = AppConfig.model_validate(args).request_policy()
    assert policy.resolve(GenerationRequest(prompt="a fox")).preview_interval == interval
    assert policy.resolve(GenerationRequest(prompt="a fox", preview_interval=7)).preview_interval == 7


def test_a_resolved_request_has_a_seed_and_nothing_left_to_default() -> None:
    resolved = AppConfig().request_policy().resolve(GenerationRequest(prompt="a fox"))
    assert 0 <= resolved.seed < 2**32
    assert set(resolved.model_dump()) == {
        "prompt", "negative_prompt", "num_inference_steps", "width", "height", "seed", "guidance_scale",
        "num_images", "preview_interval", "output_format", "sync_mode", "enable_safety_checker",
        "task", "strength", "image", "mask", "loras", "embeddings", "runner_hint",
    }  # fmt: skip
    assert (resolved.task, resolved.image, resolved.mask) == ("text-to-image", None, None)


def test_loras_are_off_by_default_on_a_rewritten_unet_and_refused_when_asked_for() -> None:
    """LoRA layers cannot be switched per request on a compiled, QKV-fused or quantized UNet."""
    assert AppConfig().request_policy().adapters.max_loras == 3
    fused = AppConfig(model={"fuse_qkv": True})
    assert fused.request_policy().adapters.max_loras == 0 and fused.request_policy().adapters.max_embeddings == 2
    with pytest.raises(ValidationError, match="QKV-fused"):
        AppConfig(model={"fuse_qkv": True}, adapters={"max_loras": 2})
    with pytest.raises(ValidationError, match="quantized"):
        AppConfig(model={"quantization": "int8_weight_only"}, adapters={"max_loras": 1})
    assert AppConfig(model={"fuse_qkv": True}, adapters={"max_loras": 0}).max_loras() == 0
