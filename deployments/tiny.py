"""The built-in tiny model: SDXL's component layout with small random weights.

It lets the whole service run and be tested with no GPU and no download. The weights are
generated deterministically (fixed seeds) into a cache directory the first time they are
needed, then loaded through the same `from_pretrained` code as real SDXL. So is its stand-in
safety checker (`safety_checker: tiny`), in a subdirectory, generated the first time it is asked for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from deployments.previews import final_pixels
from deployments.safety import SafetyChecker
from serve_app.config import cache_root

# Bump when the layout or sizes below change, so stale caches are not reused.
TINY_MODEL_VERSION = "v2"
PREVIEW_DECODER_SUBDIR = "preview_decoder"
SAFETY_CHECKER_SUBDIR = "safety_checker-v2"  # bump when the tiny checker's making below changes
_SEED = 20261124

# The one image the tiny safety checker is built to flag: the tiny model's image for these pipeline
# arguments and seed, wherever it stands in a batch (image i of a batch has seed + i). The prompt
# barely changes the tiny model's images; the seed, size, steps and guidance do.
TINY_CHECKER_FLAGS = {
    "prompt": "a red fox",
    "negative_prompt": "",
    "num_inference_steps": 2,
    "width": 128,
    "height": 128,
    "guidance_scale": 7.5,
    "seed": 1234,
}
TINY_CHECKER_THRESHOLD = 0.95  # cosine to the flagged image's embedding; other tiny images stay below 0.9
_CALIBRATION_SEEDS = range(1000, 1008)
_NEVER = 2.0  # a threshold no cosine reaches: the concepts the tiny checker does not use

TEXT_HIDDEN = 32  # per text encoder; the UNet sees both concatenated (64)
TIME_EMBED_DIM = 8


def default_cache_dir() -> Path:
    """Where the tiny model lives, under `cache_root()`."""
    return cache_root() / f"tiny-sdxl-{TINY_MODEL_VERSION}"


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the tiny model's directory, generating it first if it is missing.

    Generation writes into a temporary sibling and renames it into place, so replicas
    starting together never load a half-written model.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _generated_once(target, "model_index.json", write_tiny_model)


def ensure_tiny_safety_checker(model_dir: Path) -> Path:
    """Return the tiny safety checker's directory inside the tiny model's `model_dir`, generating it
    first if it is missing (it is built from that model's images)."""
    target = model_dir / SAFETY_CHECKER_SUBDIR
    return _generated_once(target, "config.json", lambda directory: write_tiny_safety_checker(directory, model_dir))


def _generated_once(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """`target`, written by `write` first unless it has `marker`: into a temporary sibling renamed into place."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_tiny_model(directory: Path) -> None:
    """Generate the tiny pipeline (diffusers layout) plus its preview decoder into `directory`."""
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(CLIPTextModel, projection_dim=None, seed=_SEED + 1),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, TEXT_HIDDEN, seed=_SEED + 2),
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
        unet=_unet(),
        scheduler=sdxl_scheduler(),
    )
    pipeline.save_pretrained(directory)
    _preview_decoder().save_pretrained(directory / PREVIEW_DECODER_SUBDIR)


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer over a generated vocabulary (bytes, word ends, specials)."""
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    vocab = {token: index for index, token in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _bytes_to_unicode() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (as in GPT-2/CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _text_encoder(model_class: type, projection_dim: int | None, seed: int) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=len(_bytes_to_unicode()) * 2 + 2,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    torch.manual_seed(seed)
    return model_class(config)


def _unet() -> UNet2DConditionModel:
    """SDXL-shaped UNet: text-time added conditioning over both encoders' embeddings."""
    torch.manual_seed(_SEED + 3)
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # 6 size/crop numbers, each embedded in TIME_EMBED_DIM, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN,
        norm_num_groups=8,
    )


def _vae() -> AutoencoderKL:
    """Four blocks, so three downsamples: 8x spatially, like SDXL's VAE."""
    torch.manual_seed(_SEED + 4)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=1024,
        scaling_factor=0.13025,  # SDXL's
    )


def _preview_decoder() -> AutoencoderTiny:
    """TAESD's shape (three 2x upsamples, 4 latent channels) with fewer channels.

    Two channels keep its cost next to the tiny UNet's near the real ratio: a 512x512 preview
    decodes in about 20 ms on 2 CPU cores against about 100 ms for a step (real TAESDXL: a few
    percent of an SDXL step). With 8 channels it took 65 ms and made previews look expensive.
    """
    torch.manual_seed(_SEED + 5)
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(2, 2, 2, 2),
        decoder_block_out_channels=(2, 2, 2, 2),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        scaling_factor=1.0,
    )


def write_tiny_safety_checker(directory: Path, model_dir: Path) -> None:
    """diffusers' `StableDiffusionSafetyChecker` with tiny random CLIP weights and its image processor,
    arranged to flag one image: the tiny model's for `TINY_CHECKER_FLAGS`.

    A random CLIP tower maps every tiny-model image to nearly one direction (cosines above 0.98), so
    its final layer norm's bias is shifted by the mean output over eight other tiny images: different
    images then get unrelated embeddings (cosines below 0.9 here), the same image 1.0. Concept 0 is the
    flagged image's embedding, with threshold `TINY_CHECKER_THRESHOLD`; the other 16 concepts and the
    3 special-care ones get a threshold no cosine reaches.
    """
    pipeline = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    torch.manual_seed(_SEED + 6)
    checker = SafetyChecker(
        StableDiffusionSafetyChecker(_tiny_clip_config()).eval(),
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),  # CLIP's mean/std
    )
    model = checker.model
    with torch.no_grad():
        pooled = model.vision_model(checker.clip_input(_tiny_images(pipeline, _CALIBRATION_SEEDS)))[1]
        _post_layernorm(model).bias -= pooled.mean(dim=0)
        flagged = _tiny_images(pipeline, [TINY_CHECKER_FLAGS["seed"]])
        model.concept_embeds[0] = model.visual_projection(model.vision_model(checker.clip_input(flagged))[1])[0]
        model.concept_embeds_weights.fill_(_NEVER)
        model.concept_embeds_weights[0] = TINY_CHECKER_THRESHOLD
        model.special_care_embeds_weights.fill_(_NEVER)
    model.save_pretrained(directory)
    checker.processor.save_pretrained(directory)


def _tiny_images(pipeline: StableDiffusionXLPipeline, seeds: range | list[int]) -> torch.Tensor:
    """The tiny model's 8-bit images for `TINY_CHECKER_FLAGS` at these seeds, as a generation run makes them."""
    arguments = {key: value for key, value in TINY_CHECKER_FLAGS.items() if key != "seed"}
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images = pipeline(**arguments, num_images_per_prompt=len(generators), generator=generators, output_type="pt").images
    return final_pixels(images)


def _post_layernorm(model: StableDiffusionSafetyChecker) -> torch.nn.LayerNorm:
    """The vision tower's last layer norm (`vision_model.post_layernorm`, one level deeper before transformers 5)."""
    (layer_norm,) = [module for name, module in model.vision_model.named_modules() if name.endswith("post_layernorm")]
    return layer_norm


def _tiny_clip_config() -> CLIPConfig:
    """A CLIP small enough to cost nothing; the checker uses only its vision tower and projection."""
    return CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler configuration."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


if __name__ == "__main__":
    print(json.dumps({"tiny_model": str(ensure_tiny_model())}))
