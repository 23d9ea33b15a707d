"""Model sources: the full-size random SDXL matches the real architecture; options are wired."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.models import load_models
from deployments.random_sdxl import build_components
from serve_app.config import AppConfig

# Published parameter counts of stabilityai/stable-diffusion-xl-base-1.0 and madebyollin/taesdxl.
SDXL_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "preview_decoder": 2_445_063,
}


def test_random_sdxl_has_sdxl_base_architecture() -> None:
    components = build_components("meta")  # shapes only, no memory
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}
    assert counts == SDXL_PARAMETERS
    assert components["unet"].config.addition_embed_type == "text_time"
    assert components["unet"].config.cross_attention_dim == 768 + 1280  # both encoders, concatenated
    assert components["vae"].config.force_upcast is False  # decodes in float16, as sdxl-vae-fp16-fix does


def test_scheduler_replacement(tmp_path: Path) -> None:
    config = AppConfig(
        model={
            "source": "tiny",
            "device": "cpu",
            "cache_dir": str(tmp_path),
            "scheduler": "EulerAncestralDiscreteScheduler",
            "scheduler_config": {"timestep_spacing": "trailing"},
        }
    )
    models = load_models(config.model, config.previews)
    assert type(models.pipeline.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert models.pipeline.scheduler.config.timestep_spacing == "trailing"


def test_unknown_scheduler_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(AttributeError):
        config = AppConfig(model={"source": "tiny", "device": "cpu", "cache_dir": str(tmp_path), "scheduler": "Nope"})
        load_models(config.model, config.previews)


def test_random_sdxl_refuses_weight_choices_it_would_ignore() -> None:
    with pytest.raises(ValueError, match="vae cannot apply"):
        AppConfig(model={"source": "sdxl-random", "vae": "madebyollin/sdxl-vae-fp16-fix"})
    assert AppConfig(model={"source": "sdxl-random"}).model.vae is None
