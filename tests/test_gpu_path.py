"""The GPU path's own hazards, shown on the CPU: a float16 VAE after a failed decode, warm-up shapes
under torch.compile, where the warm-up runs, and the config checks that keep GPU replicas fast."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import deployments.engine as engine_module
from deployments import pipeline_run
from deployments.engine import EngineConfig, SDXLEngine, warmup_requests
from deployments.models import LoadedModels, load_models
from deployments.preview_worker import CudaPreviewWorker
from deployments.speedups import compile_pipeline
from serve_app.config import AppConfig
from serve_app.contract.events import RESULT_ONLY
from serve_app.contract.requests import ResolvedRequest
from tests.tiny_engine import collect, resolved, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def request_at(config: AppConfig, width: int, height: int, **fields: object) -> ResolvedRequest:
    """A request as the ingress hands it over: the config's request defaults filled in."""
    return resolved(config, num_inference_steps=2, width=width, height=height, seed=0, **fields)


def test_a_failed_decode_leaves_a_float16_vae_in_float16(cache: Path) -> None:
    """SDXL's pipeline upcasts a float16 VAE that says `force_upcast` to float32 for the final decode and
    casts it back only when the decode returns. The tiny model in float16 on the CPU (its ops run in
    float16 there) with one injected decoder failure: the next request must still succeed."""
    engine = SDXLEngine(EngineConfig.of(tiny_config(cache, model={"dtype": "float16"})))
    vae = engine.models.pipeline.vae
    assert (vae.dtype, vae.config.force_upcast) == (torch.float16, True)
    decoder_forward = vae.decoder.forward

    def fail_once(*args, **kwargs):
        vae.decoder.forward = decoder_forward
        assert next(vae.parameters()).dtype == torch.float32  # the pipeline's upcast happened
        raise RuntimeError("decode failed")

    vae.decoder.forward = fail_once
    request = resolved(num_inference_steps=2, width=128, height=128, seed=0)
    assert collect(engine, request, previews=False) == [
        {"type": "error", "detail": "the generation failed", "error_type": "generation_failed"}
    ]
    assert vae.dtype == torch.float16
    assert [event["type"] for event in collect(engine, request, previews=False)] == ["final"]


@pytest.fixture
def compiled_graphs(monkeypatch: pytest.MonkeyPatch):
    """Every graph torch.compile builds for the engine's models, from the moment they are loaded.

    Inductor's kernels are not what is tested (and are slow to build on 2 CPU cores): the graphs go to
    a backend that counts them and runs them eagerly. Dynamo's shapes and guards, which decide when
    a call compiles, are the same as with inductor."""
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    load_models = engine_module.load_models

    def load_and_compile(*config: object) -> LoadedModels:
        models = load_models(*config)
        compile_pipeline(models.pipeline, backend=counting_backend)
        return models

    monkeypatch.setattr(engine_module, "load_models", load_and_compile)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def test_warm_up_compiles_every_configured_shape(cache: Path, compiled_graphs: list) -> None:
    """Turbo's case: request defaults of 128x128 (512x512 there) with `guidance_scale: 0`, a UNet batch
    of 1, plus a second size. After the warm-up no request at those shapes compiles anything; a request
    that turns classifier-free guidance on is another shape, and compiles (the documented exception)."""
    config = tiny_config(
        cache,
        model={"compile": True, "warmup_sizes": ["128x128", "192x128"]},
        requests={"defaults": {"width": 128, "height": 128, "guidance_scale": 0.0}},
    )
    engine = SDXLEngine(EngineConfig.of(config))
    compiled_at_start = len(compiled_graphs)
    assert compiled_at_start >= 4  # the UNet and the VAE decoder, at each size

    for width, height in [(128, 128), (192, 128)]:
        assert [event["type"] for event in collect(engine, request_at(config, width, height), False)] == ["final"]
    assert len(compiled_graphs) == compiled_at_start

    collect(engine, request_at(config, 128, 128, guidance_scale=7.5), previews=False)
    assert len(compiled_graphs) > compiled_at_start


def test_warm_up_runs_on_the_pipeline_thread_through_the_preview_worker(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuBLAS/cuDNN handles are per thread: the warm-up must run where requests run, and render its
    previews through the preview worker (on CUDA its side stream and pinned buffers)."""
    unet_threads: set[str] = set()
    load_models = engine_module.load_models

    def load_and_watch(*config: object) -> LoadedModels:
        models = load_models(*config)
        forward = models.pipeline.unet.forward

        def watched_forward(*args, **kwargs):
            unet_threads.add(threading.current_thread().name)
            return forward(*args, **kwargs)

        models.pipeline.unet.forward = watched_forward
        return models

    monkeypatch.setattr(engine_module, "load_models", load_and_watch)
    rendered: list[float] = []
    engine = SDXLEngine(
        EngineConfig.of(tiny_config(cache, model={"warmup_sizes": ["128x128", "128x192"]})),
        on_preview_rendered=rendered.append,
    )
    (warm_up_thread,) = unet_threads
    assert warm_up_thread.startswith("sdxl-pipeline")
    assert len(rendered) >= 2  # at least one preview per warm-up size
    unet_threads.clear()
    collect(engine, resolved(num_inference_steps=2, width=128, height=128, seed=0), previews=False)
    assert unet_threads == {warm_up_thread}


def test_warm_up_requests_are_the_served_shapes() -> None:
    config = AppConfig(
        model={"warmup_size": 512, "warmup_sizes": ["512x512", "768x512"]},
        requests={"defaults": {"width": 512, "height": 512, "guidance_scale": 0.0, "num_inference_steps": 4}},
    )
    requests = warmup_requests(config.model, config.request_policy())
    assert [(r.width, r.height, r.guidance_scale) for r in requests] == [(512, 512, 0.0), (768, 512, 0.0)]
    assert {(r.num_inference_steps, r.preview_interval) for r in requests} == {(2, 1)}  # short, every preview
    assert warmup_requests(AppConfig().model, AppConfig().request_policy()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"compile": True}, "add the request defaults' size '1024x1024'"),
        ({"compile": True, "warmup_sizes": ["512x512"]}, "'1024x1024' to `warmup_sizes`"),
        ({"compile": True, "warmup_sizes": [f"{1024 + 8 * n}x1024" for n in range(9)]}, "at most 8 graphs"),
        ({"warmup_sizes": ["1024"]}, "not WIDTHxHEIGHT"),
        ({"warmup_sizes": ["1000x1001"]}, "multiple of 8"),
        ({"warmup_size": 1001}, "multiple of 8"),
    ],
)
def test_warm_up_settings_that_would_leave_a_first_user_compiling_are_refused(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AppConfig(model=args)


def test_compile_with_the_defaults_size_warmed_up_is_accepted() -> None:
    config = AppConfig(
        model={"compile": True, "warmup_sizes": ["512x512", "1024x1024"]},
        requests={"defaults": {"width": 512, "height": 512}},
    )
    assert config.model.warmup_image_sizes() == [(512, 512), (1024, 1024)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_model_on_cuda(cache: Path) -> None:
    """On a GPU (skipped elsewhere): float16, the warm-up, previews on the side stream, and a failed
    float16 decode that leaves the next request working."""
    engine = SDXLEngine(EngineConfig.of(tiny_config(cache, model={"device": "cuda", "warmup_sizes": ["128x128"]})))
    assert isinstance(engine.previews, CudaPreviewWorker)
    assert engine.models.pipeline.vae.dtype == torch.float16
    request = resolved(num_inference_steps=4, width=128, height=128, seed=0, preview_interval=1)
    types = [event["type"] for event in collect(engine, request, previews=True)]
    assert types[0] == "preview" and types[-1] == "final"

    vae = engine.models.pipeline.vae
    decoder_forward = vae.decoder.forward

    def fail_once(*args, **kwargs):
        vae.decoder.forward = decoder_forward
        raise RuntimeError("decode failed")

    vae.decoder.forward = fail_once
    assert [event["error_type"] for event in collect(engine, request, previews=False)] == ["generation_failed"]
    assert [event["type"] for event in collect(engine, request, previews=False)] == ["final"]
    engine.check_device()


def test_final_images_are_encoded_after_the_slot_is_free_while_the_next_run_denoises(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests on one engine (a replica with `max_ongoing_requests: 2`): the first's final encode
    (slowed here, as a PNG at 1024x1024 is) runs on an encoder thread after the slot is free, and the
    second request's denoising starts while it does. The encode once held the device."""

    engine = SDXLEngine(EngineConfig.of(tiny_config(cache)))
    unet = engine.models.pipeline.unet
    forward, second_run_denoising = unet.forward, threading.Event()
    encodes: list[str] = []  # the thread of each encode
    real_encode = pipeline_run.encode_image

    def denoise(*args, **kwargs):
        if encodes:  # a step after the first encode began: the second run's
            second_run_denoising.set()
        return forward(*args, **kwargs)

    def slow_encode(*args, **kwargs):
        first = not encodes
        encodes.append(threading.current_thread().name)
        if first:
            assert second_run_denoising.wait(timeout=30), "the next run did not start while this one encoded"
        return real_encode(*args, **kwargs)

    unet.forward = denoise
    monkeypatch.setattr(pipeline_run, "encode_image", slow_encode)
    request = request_at(AppConfig(), 128, 128)

    async def two_at_once() -> list[list[str]]:
        async def one() -> list[str]:
            return [event.type async for event in engine.generate(request, RESULT_ONLY)]

        return list(await asyncio.gather(one(), one()))

    assert asyncio.run(two_at_once()) == [["final"], ["final"]]
    assert all(name.startswith("sdxl-encode") for name in encodes)
    assert second_run_denoising.is_set()


def test_the_safety_checker_reads_the_8_bit_images_its_processor_would_make_in_pil(cache: Path) -> None:
    """The checker's preprocessing runs in torch on the images' device (no PIL round trip while the
    slot is held) and gives what its CLIP image processor gives for the same images in PIL."""
    config = tiny_config(cache, model={"safety_checker": "tiny"})
    checker = load_models(config.model, config.previews).safety_checker
    checker.processor.size = {"shortest_edge": 224}  # CompVis' checker's, from a non-square image
    checker.processor.crop_size = {"height": 224, "width": 224}
    pixels = (torch.rand(2, 3, 96, 160) * 255).round().to(torch.uint8)
    ours = checker.clip_input(pixels)
    pil_images = [Image.fromarray(each.permute(1, 2, 0).numpy()) for each in pixels]
    theirs = checker.processor(pil_images, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.02  # in normalized units (a 1/255 step is about 0.015)
