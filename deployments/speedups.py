"""Optional speed-ups of a loaded pipeline, each a model config option, off by default until measured on a
GPU (`benchmarks/gpu_proof.py`): fused QKV projections, torchao quantization of the UNet, and
torch.compile of the UNet and the VAE decoder, with a mode and a persistent cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: float8 matmuls in hardware


def fuse_qkv(pipeline: StableDiffusionXLPipeline) -> None:
    """One matmul for each attention's query, key and value (self-attention; diffusers fuses key and value
    for cross-attention), in the UNet and the VAE: fewer, larger kernels."""
    pipeline.fuse_qkv_projections()


def quantize_unet(pipeline: StableDiffusionXLPipeline, scheme: str, device: torch.device) -> None:
    """torchao quantization of the UNet's linear layers (its convolutions stay as they are): 'int8_weight_only'
    and 'float8_weight_only' halve the weights' memory traffic; 'float8_dynamic' also runs the matmuls in
    float8, which needs compute capability 8.9 (Ada, Hopper). Refused with a clear error where it cannot run."""
    if scheme == "float8_dynamic" and not (
        device.type == "cuda" and torch.cuda.get_device_capability(device) >= FLOAT8_MIN_CAPABILITY
    ):
        raise ValueError("quantization 'float8_dynamic' needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper)")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as error:
        raise ValueError(f"quantization {scheme!r} needs torchao: pip install '.[quantization]'") from error
    configs = {
        "int8_weight_only": Int8WeightOnlyConfig,
        "float8_weight_only": Float8WeightOnlyConfig,
        "float8_dynamic": Float8DynamicActivationFloat8WeightConfig,
    }
    quantize_(pipeline.unet, configs[scheme]())
    logger.info("Quantized the UNet's linear layers: %s", scheme)


def use_compile_cache(directory: str) -> None:
    """Point Inductor's caches (FX graphs, autograd graphs, autotuning) at `directory`: on a volume every
    replica mounts, a replica that starts after the first loads compiled kernels instead of building them.
    Set before anything compiles; Inductor reads the variable when it first needs its cache."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True


def compile_pipeline(
    pipeline: StableDiffusionXLPipeline, backend: str | Callable = "inductor", mode: str = "default"
) -> None:
    """torch.compile the UNet and the VAE's decoder module in place, with static shapes: one graph per shape
    (size, and the UNet's batch: 2 with classifier-free guidance, 1 without), each compiled on its first
    call, which the engine's warm-up makes for every configured size. Static rather than dynamic: a second
    size would otherwise make dynamo recompile a dynamic graph that then serves every shape, slower.

    The decoder, not `vae.decode`: with VAE slicing a batch decodes one image at a time, so every image of
    every `num_images` reuses the one-image graph (a compiled `decode` unrolled N decoders per N)."""
    options = {"backend": backend, "dynamic": False}
    if mode != "default":
        options["mode"] = mode
    pipeline.unet.compile(**options)
    pipeline.vae.decoder.compile(**options)
