"""The built-in tiny model: deterministic, SDXL's layout, loadable through `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionXLPipeline
from safetensors.torch import load_file

from deployments.tiny import PREVIEW_DECODER_SUBDIR, ensure_tiny_model, write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache") / "tiny")


def _weights(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(path.relative_to(directory)): load_file(path) for path in sorted(directory.rglob("*.safetensors"))}


def test_generation_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    first, second = _weights(tiny_dir), _weights(tmp_path)
    assert first.keys() == second.keys() and len(first) == 5  # 2 text encoders, unet, vae, preview decoder
    for name, tensors in first.items():
        assert tensors.keys() == second[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, second[name][key]), f"{name}:{key}"


def test_existing_model_is_reused(tiny_dir: Path) -> None:
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model(tiny_dir) == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp


def test_has_sdxl_layout_and_8x_vae(tiny_dir: Path) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    assert pipeline.vae_scale_factor == 8
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert pipeline.text_encoder_2.config.projection_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.tokenizer("a red fox").input_ids[0] == pipeline.tokenizer.bos_token_id
    decoder = AutoencoderTiny.from_pretrained(tiny_dir / PREVIEW_DECODER_SUBDIR)
    assert decoder.config.latent_channels == pipeline.unet.config.in_channels


def test_pipeline_runs_with_cfg_and_gives_a_finite_image(tiny_dir: Path) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipeline.set_progress_bar_config(disable=True)
    steps_seen = []
    output = pipeline(
        "a red fox",
        num_inference_steps=3,
        width=128,
        height=192,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=lambda pipe, step, timestep, kwargs: steps_seen.append(kwargs["latents"].shape) or {},
    )
    assert steps_seen == [(1, 4, 24, 16)] * 3
    assert output.images.shape == (1, 3, 192, 128)
    assert torch.isfinite(output.images).all()
    assert output.images.std() > 0.01  # not a constant image
