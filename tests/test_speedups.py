"""The GPU speed-up options, validated on the CPU with the tiny model (their speed is for a GPU to
measure, `benchmarks/gpu_proof.py`): each leaves the image as it was, or close to it, and each is wired
from the config to where it acts."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deployments import models as models_module
from deployments.models import load_models
from deployments.speedups import compile_pipeline
from serve_app.config import AppConfig, ModelConfig
from tests.tiny_engine import collect, resolved, tiny_config, tiny_engine

REQUEST = resolved(num_inference_steps=3, width=128, height=128, seed=5, output_format="png")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def image_of(cache: Path, **model: object) -> np.ndarray:
    """The final image of `REQUEST` from a tiny engine with these model options, as float pixels."""
    url = collect(tiny_engine(cache, model=model), REQUEST, previews=False)[-1]["image"]["url"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), np.float32)


def test_the_vae_decoder_graph_serves_every_batch_size(cache: Path) -> None:
    """Compiling the decoder module (not `vae.decode`): with VAE slicing each image of a batch decodes
    alone, so batches of 1 and 3 run the same one-image graph; nothing compiles for the second."""
    config = tiny_config(cache)
    pipeline = load_models(config.model, config.previews).pipeline
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    try:
        compile_pipeline(pipeline, backend=counting_backend)
        latents = torch.randn(3, 4, 16, 16)
        with torch.inference_mode():
            pipeline.vae.decode(latents[:1])
            after_one = len(graphs)
            decoded = pipeline.vae.decode(latents).sample
        assert after_one >= 1 and len(graphs) == after_one
        assert decoded.shape == (3, 3, 128, 128)
    finally:
        torch._dynamo.reset()


def test_compile_mode_and_cache_reach_torch_compile(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a GPU, `compile: true` compiles with the configured mode after pointing Inductor's caches at
    `compile_cache_dir` (run here on the CPU with torch.compile recorded rather than run)."""
    config = tiny_config(cache)
    pipeline = load_models(config.model, config.previews).pipeline
    compiled: list[str] = []
    monkeypatch.setattr(models_module, "compile_pipeline", lambda pipeline, mode: compiled.append(mode))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")
    model = ModelConfig(compile=True, compile_mode="reduce-overhead", compile_cache_dir=str(tmp_path / "inductor"))
    models_module._optimize_for_cuda(pipeline, model)
    assert compiled == ["reduce-overhead"]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") and (tmp_path / "inductor").is_dir()


def test_compile_options_without_compile_are_refused() -> None:
    with pytest.raises(ValueError, match="only with compile: true"):
        AppConfig(model={"compile_mode": "reduce-overhead"})


def test_fused_qkv_projections_give_the_same_image(cache: Path) -> None:
    config = tiny_config(cache, model={"fuse_qkv": True})
    unet = load_models(config.model, config.previews).pipeline.unet
    assert any(getattr(module, "fused_projections", False) for module in unet.modules())
    difference = np.abs(image_of(cache, fuse_qkv=True) - image_of(cache)).mean()
    assert difference < 0.5  # one fused matmul against three: float32 rounding only


def test_int8_weights_give_a_close_image(cache: Path) -> None:
    config = tiny_config(cache, model={"quantization": "int8_weight_only"})
    unet = load_models(config.model, config.previews).pipeline.unet
    linear = next(module for module in unet.modules() if isinstance(module, torch.nn.Linear))
    assert type(linear.weight).__name__ != "Parameter"  # a torchao tensor subclass holding int8
    quantized = image_of(cache, quantization="int8_weight_only")
    assert np.isfinite(quantized).all()
    assert np.abs(quantized - image_of(cache)).mean() < 8.0  # out of 255: close, not equal


def test_float8_matmuls_are_refused_where_the_hardware_has_none(cache: Path) -> None:
    with pytest.raises(ValueError, match="compute capability 8.9"):
        tiny_engine(cache, model={"quantization": "float8_dynamic"})
