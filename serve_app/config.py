"""Every knob of the application, in sections, validated once when the app is built.

`serve_config.yaml` and `configs/*.yaml` pass these as the application's `args`:

    args:
      app_id: local/sdxl
      model: {source: tiny, device: cpu}
      previews: {interval: 5}
      requests: {timeout_s: 300}
      queue: {store: memory}
      status_server: {port: 8001}

Each deployment is bound to the sections it reads (`serve_app.app.build_app`). The flat keys of
earlier releases (`model: tiny`, `job_store`, `status_port`, ...) are still accepted and moved to
their section, with a warning naming the new place (`LEGACY_KEYS`). Serve-level settings
(replicas, autoscaling, GPUs, queue bounds) live in the YAML's `deployments`, not here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.contract.adapters import MAX_ADAPTERS_PER_FIELD, AdapterPolicy
from serve_app.contract.requests import (
    DEFAULT_PREVIEW_INTERVAL,
    MAX_BATCH_PIXELS,
    MAX_NUM_IMAGES,
    MIN_SIDE,
    REQUEST_PROFILES,
    GenerationRequest,
    RequestPolicy,
    resolved_request_fields,
)

logger = logging.getLogger("ray.serve")


def cache_root() -> Path:
    """`$SDXL_SERVE_CACHE`, or `~/.cache/sdxl-serve`: where the service keeps what it makes for itself (the tiny
    model, the default adapter directory, local outputs, a kept webhook signing key) in each process."""
    return Path(os.environ.get("SDXL_SERVE_CACHE") or Path.home() / ".cache" / "sdxl-serve")


TINY_MODEL = "tiny"
RANDOM_SDXL = "sdxl-random"  # full-size architecture, random weights: for timing only
NO_SAFETY_CHECKER = "none"
TAESDXL = "madebyollin/taesdxl"
COMPILED_SHAPES_LIMIT = 8  # torch._dynamo.config.recompile_limit's default: graphs per compiled function
DEFAULT_MAX_LORAS = 3
APP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """What each SDXL replica loads, and how it runs it."""

    source: str = Field(
        default=TINY_MODEL,
        description="'tiny' (built-in, offline), 'sdxl-random' (full-size, random weights, for timing), "
        "a local diffusers directory, or a Hugging Face id.",
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="'auto': float16 on CUDA, float32 on CPU."
    )
    variant: str | None = Field(
        default=None, description="Weights variant, e.g. 'fp16'; default: 'fp16' for float16 hub models."
    )
    cache_dir: str | None = Field(default=None, description="Where the tiny model and hub downloads are kept.")
    vae: str | None = Field(
        default=None,
        description="A replacement VAE (directory or hub id), e.g. madebyollin/sdxl-vae-fp16-fix, "
        "which decodes in float16 without SDXL's float32 upcast.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the UNet and VAE decoder (CUDA only), one static graph per image shape: "
        "list every size the service should serve fast in `warmup_sizes`.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        default="default",
        description="torch.compile's mode with `compile`: 'reduce-overhead' replays CUDA graphs (few-step models at "
        "512, where kernel launches dominate), 'max-autotune' also tunes kernels (longer compiles). Off until "
        "measured.",
    )
    compile_cache_dir: str | None = Field(
        default=None,
        description="Inductor's cache directory with `compile` (its FX graph, autograd and autotuning caches): on a "
        "volume every replica mounts, a new replica loads compiled kernels instead of compiling for minutes.",
    )
    fuse_qkv: bool = Field(
        default=False,
        description="Fuse each attention's query, key and value projections into one matmul (diffusers' "
        "`fuse_qkv_projections`, UNet and VAE). Off until measured.",
    )
    quantization: Literal["none", "int8_weight_only", "float8_weight_only", "float8_dynamic"] = Field(
        default="none",
        description="torchao quantization of the UNet's linear layers (`pip install '.[quantization]'`): int8 or "
        "float8 weights, or float8 weights and activations ('float8_dynamic': CUDA compute capability 8.9+, e.g. "
        "Hopper). Off until measured.",
    )
    warmup_size: int | None = Field(
        default=None, ge=128, le=2048, multiple_of=8, description="Shorthand for `warmup_sizes: [NxN]`."
    )
    warmup_sizes: list[str] = Field(
        default_factory=list,
        description="'WIDTHxHEIGHT' sizes to run a short generation at, at replica start, as a request with "
        "the request defaults' other fields runs (its CUDA kernels, the preview stream; with `compile` its "
        "graphs), so the first user does not pay for it. With `compile` the defaults' size must be listed; "
        "any other size, or the other side of classifier-free guidance, compiles on first use (about a minute).",
    )
    scheduler: str | None = Field(
        default=None, description="A diffusers scheduler class name to replace the model's own (few-step models)."
    )
    scheduler_config: dict = Field(default_factory=dict, description="Overrides for the scheduler's config.")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch in each SDXL replica.")
    watchdog_s: float = Field(
        default=300.0,
        gt=0,
        description="A run with no step and no preview for this long means a hung device: the health check "
        "fails and the replica leaves service. Above the longest step, final decode, and first-use compile.",
    )
    safety_checker: str = Field(
        default=NO_SAFETY_CHECKER,
        description="'none' (nothing checked: `has_nsfw_concepts` is null per image), 'tiny' (a built-in stand-in "
        "that flags one known tiny-model image), or a diffusers StableDiffusionSafetyChecker with its CLIP image "
        "processor: a local directory or a hub id such as CompVis/stable-diffusion-safety-checker.",
    )

    @field_validator("warmup_sizes")
    @classmethod
    def _warmup_sizes_are_request_sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit()):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT, e.g. '1024x1024'")
            GenerationRequest.model_validate({"prompt": "check", "width": int(width), "height": int(height)})
        return sizes

    @model_validator(mode="after")
    def _compile_options_need_compile(self) -> ModelConfig:
        if not self.compile and (self.compile_mode != "default" or self.compile_cache_dir):
            raise ValueError("compile_mode and compile_cache_dir take effect only with compile: true")
        return self

    def warmup_image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each warm-up run, without repeats: `warmup_size`'s square, then `warmup_sizes`."""
        sizes = [(self.warmup_size, self.warmup_size)] if self.warmup_size else []
        for size in self.warmup_sizes:
            width, height = size.split("x")
            sizes.append((int(width), int(height)))
        return list(dict.fromkeys(sizes))


class PreviewConfig(Section):
    """TAESD previews of the latents while a generation denoises."""

    decoder: str | None = Field(
        default=None,
        description="TAESD-shaped decoder: 'tiny', a local directory or a hub id; "
        "default: the tiny model's own for 'tiny', else madebyollin/taesdxl.",
    )
    interval: int = Field(default=DEFAULT_PREVIEW_INTERVAL, ge=1, le=50, description="Default steps between previews.")
    max_size: int = Field(default=512, ge=64, le=2048, description="Long side of preview images, pixels.")
    jpeg_quality: int = Field(default=70, ge=1, le=100)


class RequestConfig(Section):
    """Defaults and limits for what clients ask, and how long a request may take."""

    profile: Literal["default", "fast-sdxl"] = Field(
        default="default",
        description="Defaults for fields a client leaves out, before `defaults`: 'default' (20 steps, "
        "negative prompt 'blurry, low quality', 1024x1024, JPEG) or 'fast-sdxl' (fal fast-sdxl's: 25 steps, "
        "guidance 7.5, negative prompt '', square_hd, JPEG).",
    )
    defaults: dict = Field(
        default_factory=dict,
        description="Defaults for request fields a client leaves out, e.g. a few-step model's "
        "{num_inference_steps: 4, guidance_scale: 0.0}; what a client sends always wins.",
    )
    max_num_images: int = Field(
        default=MAX_NUM_IMAGES,
        ge=1,
        le=MAX_NUM_IMAGES,
        description="Most images one request may ask for (`num_images`, one batched pipeline call); beyond: 422.",
    )
    max_batch_pixels: int = Field(
        default=MAX_BATCH_PIXELS,
        ge=MIN_SIDE * MIN_SIDE,
        description="Most pixels one request may generate, width x height x num_images (one batched pipeline "
        "call): past the size a GPU's kernels can launch, or its memory hold, a request fails; beyond: 422.",
    )
    final_jpeg_quality: int = Field(default=95, ge=1, le=100)
    timeout_s: float = Field(
        default=300.0, gt=0, description="A generation running longer than this ends with an error event."
    )
    queue_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a request may wait for a replica (until its first event) before it ends "
        "with a `queue_timeout` error: no replica, or none free, never means a hang.",
    )

    @field_validator("defaults")
    @classmethod
    def _defaults_are_valid_request_fields(cls, defaults: dict) -> dict:
        return resolved_request_fields(defaults)  # unknown or bad values fail here; fal's names resolved

    @model_validator(mode="after")
    def _default_batch_is_allowed(self) -> RequestConfig:
        num_images = self.defaults_in_effect().get("num_images", 1)
        if num_images > self.max_num_images:
            raise ValueError(f"the request defaults' num_images {num_images} is over max_num_images")
        defaults = self.defaults_in_effect()
        pixels = defaults.get("width", 1024) * defaults.get("height", 1024) * num_images
        if pixels > self.max_batch_pixels:
            raise ValueError(f"the request defaults' width x height x num_images ({pixels}) is over max_batch_pixels")
        return self

    def defaults_in_effect(self) -> dict:
        """The profile's defaults with `defaults` over them, in this service's field names."""
        return {**REQUEST_PROFILES[self.profile], **self.defaults}


# What Serve's proxy lets through to an image route, whatever `inputs.max_body_bytes` says: the proxy starts
# before any config is read (`serve_app.http.edge`), so its bound is this ceiling.
IMAGE_BODY_CEILING_BYTES = 64 * 1024 * 1024
IMAGE_BODY_TIMEOUT_CEILING_S = 120.0


class InputConfig(Section):
    """Images clients send (image to image, inpainting): where they may come from and how large they may be."""

    url_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the service fetches (exact, '.example.com' for subdomains, '*' "
        "for any public host); empty: URL inputs are off (data URIs, this service's own URLs and uploads still work).",
    )
    url_allow_private_networks: bool = Field(
        default=False,
        description="Fetch from private, loopback and link-local addresses too (checked at connect time). Only for "
        "a trusted network: it lets a client make the service call internal hosts.",
    )
    url_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Time limit to fetch one image URL.")
    max_image_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest image file accepted, however it arrives."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=MIN_SIDE * MIN_SIDE,
        description="Largest image, width x height, read from its header before it is decoded (a decompression "
        "bomb is refused without being decoded). Larger inputs are refused; inputs within it are scaled to fit "
        "the output sides (2048 px at most) unless the request gives a size.",
    )
    max_body_bytes: int = Field(
        default=48 * 1024 * 1024,
        ge=1024 * 1024,
        le=IMAGE_BODY_CEILING_BYTES,
        description="Body limit of the image routes and of uploads (text-to-image routes keep 1 MiB): a data URI of "
        "an 8-megapixel PNG fits.",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, le=IMAGE_BODY_TIMEOUT_CEILING_S, description="Time limit for an image route's body."
    )
    upload_expiration_s: float = Field(
        default=24 * 3600.0, ge=60, description="How long an upload (fal's storage protocol) is kept to be used."
    )


class AdapterConfig(Section):
    """LoRAs and textual-inversion embeddings requests name (`loras`, `embeddings`): where they may come from,
    how many a request may name, and how many each model replica keeps loaded."""

    max_loras: int | None = Field(
        default=None,
        ge=0,
        le=MAX_ADAPTERS_PER_FIELD,
        description="LoRAs per request; 0 refuses them. Default 3, or 0 where the UNet is compiled, QKV-fused or "
        "quantized (LoRA layers cannot be applied to those per request; docs/configuration.md says why).",
    )
    max_embeddings: int = Field(default=2, ge=0, le=MAX_ADAPTERS_PER_FIELD, description="Embeddings per request.")
    local_dir: str | None = Field(
        default=None,
        description="The directory of .safetensors adapters a `path` may name by file name, on every model "
        "replica's node; unset: `$SDXL_SERVE_CACHE/adapters` (`~/.cache/sdxl-serve/adapters`), where "
        "`python -m deployments.tiny_adapters` writes. Hugging Face ids need no setting (the hub cache).",
    )
    names: bool = Field(
        default=True, description="Load adapters by name (local files, Hugging Face ids); false: by URL only."
    )
    url_timeout_s: float = Field(
        default=120.0, gt=0, le=1800, description="Time limit to download one adapter URL (`inputs.url_allowed_hosts`)."
    )
    max_file_bytes: int = Field(
        default=1024**3,
        ge=1024,
        description="Largest adapter file loaded, however it arrives (an SDXL LoRA: 20-900 MB).",
    )
    download_dir: str | None = Field(
        default=None, description="Where adapters fetched by URL are kept on each replica's node (a temp dir if unset)."
    )
    cache_max_count: int = Field(
        default=8, ge=1, le=64, description="LoRAs each model replica keeps loaded, least recently used evicted."
    )
    cache_max_bytes: int = Field(
        default=4 * 1024**3, ge=1024, description="Bytes of LoRA weights each model replica keeps loaded."
    )


class HttpConfig(Section):
    """The HTTP side: keys, browsers, hosts, per-client limits and the stream's timing."""

    api_keys_env: str = Field(
        default="SDXL_SERVE_API_KEYS",
        description="Environment variable holding comma-separated API keys; when it is set and non-empty, "
        "POST requests need `Authorization: Key <key>`. Keys are never put in args: Serve logs args.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description='Origins a browser app may call from (`["*"]` for any); CORS is off when empty.',
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the service answers for (exact, '.example.com' for subdomains, '*' for any), "
        "besides loopback names on a loopback address. Empty: on a loopback address only loopback names "
        "(no DNS rebinding), elsewhere any. Set it when a front proxy on the same host forwards a public name.",
    )
    max_generations_per_client: int | None = Field(
        default=None,
        ge=1,
        description="Streams, runs and queue jobs (queued or running) one client may have at once on an "
        "ingress replica; beyond: 429 + Retry-After. The client is its API key, else its address. Off: None.",
    )
    max_polls_per_client_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Status polls (status, its stream, result) one client may make a second on an ingress "
        "replica, on Serve's port and the status port alike; beyond: 429 + Retry-After. fal_client polls a job "
        "10 times a second. The client is its API key, else its address. Off: None.",
    )
    client_address_header: str | None = Field(
        default=None,
        description="Header holding the client's address, set by a trusted front proxy (e.g. 'x-real-ip'); "
        "used by the per-client limits without API keys. Never set it without such a proxy.",
    )
    keepalive_s: float = Field(
        default=15.0, gt=0, description="Idle seconds before an SSE comment keeps proxies from closing the stream."
    )
    first_event_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="How long /stream waits for the first event before committing to HTTP 200, "
        "so that a rejected or failed request still gets a proper status code.",
    )


class QueueConfig(Section):
    """fal's queue: where jobs live, leases and retries, webhooks."""

    store: Literal["memory", "redis"] = Field(
        default="memory",
        description="Where queued jobs live: 'memory' (the job-queue replica's process; lost with it) or "
        "'redis' (survive restarts, redeploys and lost nodes; the URL comes from `redis_url_env`).",
    )
    redis_url_env: str = Field(
        default="SDXL_SERVE_REDIS_URL",
        description="Environment variable holding the Redis URL (it may carry a password: never in args).",
    )
    max_queued: int = Field(
        default=1000, ge=1, description="Jobs waiting beyond this many: submit answers 503 + Retry-After."
    )
    result_ttl_s: float = Field(
        default=3600.0, gt=0, description="How long finished jobs (status, result) are kept; images: `outputs_*`."
    )
    lease_s: float = Field(
        default=15.0,
        ge=1,
        description="A running job's lease; a job whose job-queue replica died goes back to the queue after it.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts of one job before it fails: a job whose job-queue replica or model replica died "
        "is run again, up to this many times in all.",
    )
    store_wait_s: float = Field(
        default=2.0,
        gt=0,
        description="How long a client's queue call waits for a store that does not answer (Redis restarting or "
        "paused) before it gets 503 + Retry-After. Jobs already running wait for it as long as it takes.",
    )
    max_finished_jobs: int = Field(default=10_000, ge=1, description="Finished jobs kept; the oldest evicted.")
    max_finished_bytes: int = Field(
        default=1024**3, ge=1, description="Bytes of finished jobs kept (results, logs, images); the oldest evicted."
    )
    max_finished_jobs_per_client: int = Field(
        default=1_000, ge=1, description="Finished jobs kept per owner (API key): one client cannot evict everyone's."
    )
    max_finished_bytes_per_client: int = Field(default=256 * 1024**2, ge=1, description="Bytes kept per owner.")
    shutdown_handoff_s: float = Field(
        default=10.0,
        ge=0,
        description="A stopping job-queue replica hands jobs no model replica has taken back at once, lets its "
        "running jobs finish for this long, then hands those back too (keep it under the deployment's "
        "`graceful_shutdown_timeout_s`).",
    )
    previews: bool = Field(
        default=True,
        description="Queued jobs make TAESD previews (at the request's `preview_interval`) for viewers of their "
        "status stream with `?previews=1`; off: no preview is decoded for a queued job.",
    )
    outputs_url: str = Field(
        default="",
        description="Where result images are stored: `s3://bucket/prefix` (endpoint, region and credentials from "
        "the `AWS_*` environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), or a directory; empty: `outputs` "
        "beside the model cache. Never in Redis.",
    )
    outputs_presigned_urls: bool = Field(
        default=False,
        description="Answer with the object store's presigned URLs (at most 7 days) instead of `/files/...` URLs "
        "the app serves under their own unguessable token.",
    )
    outputs_default_expiration_s: float = Field(
        default=7 * 86400, gt=0, description="How long result images are kept when the client asks nothing."
    )
    outputs_max_expiration_s: float | None = Field(
        default=30 * 86400,
        gt=0,
        description="The most a client may ask for with X-Fal-Object-Lifecycle-Preference (and what its `null` "
        "gets); null: no limit, kept until deleted by hand.",
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names `?fal_webhook=` URLs may point at (exact, or '.example.com' for subdomains); "
        "empty: webhooks are refused at submit. The service calls only these: anything else would be an SSRF hole.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60, description="Per webhook attempt.")
    webhook_signing_key_env: str = Field(
        default="SDXL_SERVE_WEBHOOK_SIGNING_KEY",
        description="Environment variable holding the Ed25519 key webhooks are signed with (PEM, or the base64 "
        "of its 32-byte seed; from a Secret, never in args). Unset: one is generated once and kept (in Redis, or "
        "beside the model cache); either way its public key is at /.well-known/jwks.json.",
    )
    webhook_attempts: int = Field(
        default=10, ge=1, le=20, description="Attempts per webhook (fal's: 10 over about two hours)."
    )
    webhook_retry_base_s: float = Field(
        default=15.0,
        gt=0,
        description="The wait before the second attempt; each later one waits twice the last (10 attempts: ~2 h).",
    )


class StatusServerConfig(Section):
    """The status port: health and queue status polls answered by each ingress replica under plain uvicorn."""

    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="A port on which every ingress replica also answers `GET /health` and queue status polls "
        "itself, under plain uvicorn: no hop through Serve's proxy, which costs ~20x these requests. A front "
        "proxy routes only those there (configs/nginx-front-proxy.conf). One replica of the app per node holds "
        "it and another takes it over when it goes; give each app its own. Off when unset.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="The IP address `port` listens on: '0.0.0.0' when the front proxy runs on another host.",
    )

    @field_validator("host")
    @classmethod
    def _an_ip_address(cls, value: str) -> str:
        ipaddress.ip_address(value)  # a ValueError names the field; a host name could resolve to either family
        return value


SECTIONS = ("model", "previews", "requests", "http", "queue", "inputs", "adapters", "status_server")

# Flat keys of earlier releases -> (section, field).
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "source"),
    **{
        key: ("model", key)
        for key in (
            "device",
            "dtype",
            "variant",
            "cache_dir",
            "vae",
            "compile",
            "warmup_size",
            "warmup_sizes",
            "scheduler",
            "scheduler_config",
            "torch_threads",
            "safety_checker",
        )
    },
    "preview_decoder": ("previews", "decoder"),
    "preview_interval": ("previews", "interval"),
    "preview_max_size": ("previews", "max_size"),
    "preview_jpeg_quality": ("previews", "jpeg_quality"),
    "request_profile": ("requests", "profile"),
    "request_defaults": ("requests", "defaults"),
    "max_num_images": ("requests", "max_num_images"),
    "final_jpeg_quality": ("requests", "final_jpeg_quality"),
    "request_timeout_s": ("requests", "timeout_s"),
    "queue_timeout_s": ("requests", "queue_timeout_s"),
    **{
        key: ("http", key)
        for key in (
            "api_keys_env",
            "cors_allow_origins",
            "allowed_hosts",
            "max_generations_per_client",
            "client_address_header",
            "keepalive_s",
            "first_event_wait_s",
        )
    },
    "job_store": ("queue", "store"),
    "redis_url_env": ("queue", "redis_url_env"),
    "max_queued_jobs": ("queue", "max_queued"),
    "job_result_ttl_s": ("queue", "result_ttl_s"),
    "job_lease_s": ("queue", "lease_s"),
    "job_max_attempts": ("queue", "max_attempts"),
    "webhook_allowed_hosts": ("queue", "webhook_allowed_hosts"),
    "webhook_timeout_s": ("queue", "webhook_timeout_s"),
    "webhook_attempts": ("queue", "webhook_attempts"),
    "status_port": ("status_server", "port"),
    "status_host": ("status_server", "host"),
}


def sectioned(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with every flat key of earlier releases moved into its section (a warning names each).
    A section is a mapping; `model: <str>` is the flat key for `model.source`."""
    result: dict[str, Any] = {}
    for key, value in args.items():
        if key in SECTIONS and isinstance(value, dict):
            for field, field_value in value.items():
                _put(result, key, field, field_value)
        elif key in LEGACY_KEYS:
            section, field = LEGACY_KEYS[key]
            logger.warning("Config: `%s` is now `%s.%s` (the flat key still works)", key, section, field)
            _put(result, section, field, value)
        else:
            result[key] = value  # app_id, or a mistake that validation names
    return result


def _put(args: dict[str, Any], section: str, field: str, value: Any) -> None:
    fields = args.setdefault(section, {})
    if not isinstance(fields, dict):
        raise ValueError(f"`{section}` must be a mapping of its fields")
    if field in fields:
        raise ValueError(f"`{section}.{field}` is given twice (as a flat key and in its section)")
    fields[field] = value


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    app_id: str = Field(
        default="local/sdxl",
        pattern=APP_ID_PATTERN,
        description="The fal app id clients call ('owner/alias'): run at POST /{app_id} and /{app_id}/stream, "
        "the queue under /queue/{app_id}. 'fal-ai/fast-sdxl' makes code written for fal's fast-sdxl run unchanged.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    previews: PreviewConfig = Field(default_factory=PreviewConfig)
    requests: RequestConfig = Field(default_factory=RequestConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    inputs: InputConfig = Field(default_factory=InputConfig)
    adapters: AdapterConfig = Field(default_factory=AdapterConfig)
    status_server: StatusServerConfig = Field(default_factory=StatusServerConfig)

    @model_validator(mode="before")
    @classmethod
    def _flat_keys_moved_to_sections(cls, args: Any) -> Any:
        return sectioned(args) if isinstance(args, dict) else args

    @model_validator(mode="after")
    def _random_sdxl_has_no_weights_to_choose(self) -> AppConfig:
        chosen = [
            name
            for name, value in (
                ("vae", self.model.vae),
                ("variant", self.model.variant),
                ("previews.decoder", self.previews.decoder),
            )
            if value is not None
        ]
        if self.model.source == RANDOM_SDXL and chosen:
            raise ValueError(f"'{RANDOM_SDXL}' builds all of its networks; {', '.join(chosen)} cannot apply to it")
        return self

    @model_validator(mode="after")
    def _compiled_shapes_are_warmed_up(self) -> AppConfig:
        """Compiling a shape takes about a minute: the default request's must be paid at replica start."""
        if not self.model.compile:
            return self
        defaults = self.request_policy().resolve(GenerationRequest(prompt="check"))
        sizes = self.model.warmup_image_sizes()
        if (defaults.width, defaults.height) not in sizes:
            raise ValueError(
                f"compile: true compiles each image size on first use (about a minute): add the request "
                f"defaults' size '{defaults.width}x{defaults.height}' to `warmup_sizes`"
            )
        if len(sizes) > COMPILED_SHAPES_LIMIT:
            raise ValueError(
                f"torch.compile keeps at most {COMPILED_SHAPES_LIMIT} graphs per function "
                f"(torch._dynamo.config.recompile_limit); {len(sizes)} warm-up sizes would run some uncompiled"
            )
        return self

    @model_validator(mode="after")
    def _loras_only_on_a_plain_unet(self) -> AppConfig:
        if self.adapters.max_loras and self.unet_rewritten():
            raise ValueError(
                f"adapters.max_loras: LoRAs cannot be applied per request to a {self.unet_rewritten()} UNet "
                "(docs/configuration.md says why): set adapters.max_loras: 0, or leave it out"
            )
        return self

    def unet_rewritten(self) -> str:
        """How the UNet is rewritten at load ('' when it is not): compiled, QKV-fused or quantized."""
        model = self.model
        return ", ".join(
            name
            for name, applied in (
                ("compiled", model.compile),
                ("QKV-fused", model.fuse_qkv),
                ("quantized", model.quantization != "none"),
            )
            if applied
        )

    def max_loras(self) -> int:
        """`adapters.max_loras`, or its default: 3 on a plain UNet, 0 on a rewritten one."""
        if self.adapters.max_loras is not None:
            return self.adapters.max_loras
        return 0 if self.unet_rewritten() else DEFAULT_MAX_LORAS

    def request_policy(self) -> RequestPolicy:
        """How a client's request becomes a `ResolvedRequest`: the profile, then `requests.defaults`, and
        `previews.interval` where neither the request nor the defaults name one."""
        return RequestPolicy(
            defaults=self.requests.defaults_in_effect(),
            preview_interval=self.previews.interval,
            max_num_images=self.requests.max_num_images,
            max_batch_pixels=self.requests.max_batch_pixels,
            adapters=AdapterPolicy(
                max_loras=self.max_loras(),
                max_embeddings=self.adapters.max_embeddings,
                url_hosts=tuple(self.inputs.url_allowed_hosts),
                names=self.adapters.names,
            ),
        )
