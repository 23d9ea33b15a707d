"""Every knob of the application, validated once when the app is built.

`serve_config.yaml` and `configs/*.yaml` pass these as the application's `args`.
Serve-level settings (replicas, autoscaling, GPUs, queue bounds) live in the YAML, not here.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.errors import ValidationFailed
from serve_app.schemas import MAX_NUM_IMAGES, REQUEST_PROFILES, GenerationRequest, resolved_request_fields

TINY_MODEL = "tiny"
RANDOM_SDXL = "sdxl-random"  # full-size architecture, random weights: for timing only
NO_SAFETY_CHECKER = "none"
TAESDXL = "madebyollin/taesdxl"
COMPILED_SHAPES_LIMIT = 8  # torch._dynamo.config.recompile_limit's default: graphs per compiled function


APP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app_id: str = Field(
        default="local/sdxl",
        pattern=APP_ID_PATTERN,
        description="The fal app id clients call ('owner/alias'): run at POST /{app_id} and /{app_id}/stream, "
        "the queue under /queue/{app_id}. 'fal-ai/fast-sdxl' makes code written for fal's fast-sdxl run unchanged.",
    )

    model: str = Field(
        default=TINY_MODEL,
        description="'tiny' (built-in, offline), 'sdxl-random' (full-size, random weights, for timing), "
        "a local diffusers directory, or a Hugging Face id.",
    )
    preview_decoder: str | None = Field(
        default=None,
        description="TAESD-shaped decoder: 'tiny', a local directory or a hub id; "
        "default: the tiny model's own for 'tiny', else madebyollin/taesdxl.",
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
    request_defaults: dict = Field(
        default_factory=dict,
        description="Defaults for request fields a client leaves out, e.g. a few-step model's "
        "{num_inference_steps: 4, guidance_scale: 0.0}; what a client sends always wins.",
    )
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch in each SDXL replica.")

    preview_interval: int = Field(default=5, ge=1, le=50, description="Default steps between previews.")
    preview_max_size: int = Field(default=512, ge=64, le=2048, description="Long side of preview images, pixels.")
    preview_jpeg_quality: int = Field(default=70, ge=1, le=100)
    final_jpeg_quality: int = Field(default=95, ge=1, le=100)

    request_timeout_s: float = Field(
        default=300.0, gt=0, description="A generation running longer than this ends with an error event."
    )
    queue_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a request may wait for a replica (until its first event) before it ends "
        "with a `queue_timeout` error: no replica, or none free, never means a hang.",
    )
    keepalive_s: float = Field(
        default=15.0, gt=0, description="Idle seconds before an SSE comment keeps proxies from closing the stream."
    )
    api_keys_env: str = Field(
        default="SDXL_SERVE_API_KEYS",
        description="Environment variable holding comma-separated API keys; when it is set and non-empty, "
        "POST requests need `Authorization: Key <key>`. Keys are never put in args: Serve logs args.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description='Origins a browser app may call from (`["*"]` for any); CORS is off when empty.',
    )
    first_event_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="How long /stream waits for the first event before committing to HTTP 200, "
        "so that a rejected or failed request still gets a proper status code.",
    )

    job_store: Literal["memory", "redis"] = Field(
        default="memory",
        description="Where queued jobs live: 'memory' (the job-queue replica's process; lost with it) or "
        "'redis' (survive restarts, redeploys and lost nodes; the URL comes from `redis_url_env`).",
    )
    redis_url_env: str = Field(
        default="SDXL_SERVE_REDIS_URL",
        description="Environment variable holding the Redis URL (it may carry a password: never in args).",
    )
    max_queued_jobs: int = Field(
        default=1000, ge=1, description="Jobs waiting beyond this many: submit answers 503 + Retry-After."
    )
    job_result_ttl_s: float = Field(default=3600.0, gt=0, description="How long finished jobs and images are kept.")
    job_lease_s: float = Field(
        default=15.0,
        ge=1,
        description="A running job's lease; a job whose job-queue replica died goes back to the queue after it.",
    )
    job_max_attempts: int = Field(default=3, ge=1, description="Dispatches of one job before it fails.")
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names `?fal_webhook=` URLs may point at (exact, or '.example.com' for subdomains); "
        "empty: webhooks are refused at submit. The service calls only these: anything else would be an SSRF hole.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60, description="Per webhook attempt.")
    webhook_attempts: int = Field(default=3, ge=1, le=10, description="Tries per webhook, with backoff.")

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
    client_address_header: str | None = Field(
        default=None,
        description="Header holding the client's address, set by a trusted front proxy (e.g. 'x-real-ip'); "
        "used by `max_generations_per_client` without API keys. Never set it without such a proxy.",
    )

    status_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="A port on which every ingress replica also answers `GET /health` and queue status polls "
        "itself, under plain uvicorn: no hop through Serve's proxy, which costs ~20x these requests. A front "
        "proxy routes only those there (configs/nginx-front-proxy.conf). One replica of the app per node holds "
        "it and another takes it over when it goes; give each app its own. Off when unset.",
    )
    status_host: str = Field(
        default="127.0.0.1",
        description="The IP address `status_port` listens on: '0.0.0.0' when the front proxy runs on another host.",
    )

    @field_validator("status_host")
    @classmethod
    def _an_ip_address(cls, value: str) -> str:
        ipaddress.ip_address(value)  # a ValueError names the field; a host name could resolve to either family
        return value

    # fal fast-sdxl compatibility: its request defaults, batches, and a safety checker.
    request_profile: Literal["default", "fast-sdxl"] = Field(
        default="default",
        description="Defaults for fields a client leaves out, before `request_defaults`: 'default' (20 steps, "
        "negative prompt 'blurry, low quality', 1024x1024, JPEG) or 'fast-sdxl' (fal fast-sdxl's: 25 steps, "
        "guidance 7.5, negative prompt '', square_hd, JPEG).",
    )
    max_num_images: int = Field(
        default=MAX_NUM_IMAGES,
        ge=1,
        le=MAX_NUM_IMAGES,
        description="Most images one request may ask for (`num_images`, one batched pipeline call); beyond: 422.",
    )
    safety_checker: str = Field(
        default=NO_SAFETY_CHECKER,
        description="'none' (nothing checked: `has_nsfw_concepts` is null per image), 'tiny' (a built-in stand-in "
        "that flags one known tiny-model image), or a diffusers StableDiffusionSafetyChecker with its CLIP image "
        "processor: a local directory or a hub id such as CompVis/stable-diffusion-safety-checker.",
    )

    @field_validator("request_defaults")
    @classmethod
    def _defaults_are_valid_request_fields(cls, defaults: dict) -> dict:
        return resolved_request_fields(defaults)  # unknown or bad values fail here; fal's names resolved

    @model_validator(mode="after")
    def _default_batch_is_allowed(self) -> AppConfig:
        num_images = self.request_defaults_in_effect().get("num_images", 1)
        if num_images > self.max_num_images:
            raise ValueError(f"the request defaults' num_images {num_images} is over max_num_images")
        return self

    @model_validator(mode="after")
    def _random_sdxl_has_no_weights_to_choose(self) -> AppConfig:
        chosen = [name for name in ("vae", "preview_decoder", "variant") if getattr(self, name) is not None]
        if self.model == RANDOM_SDXL and chosen:
            raise ValueError(f"'{RANDOM_SDXL}' builds all of its networks; {', '.join(chosen)} cannot apply to it")
        return self

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
    def _compiled_shapes_are_warmed_up(self) -> AppConfig:
        """Compiling a shape takes about a minute: the default request's must be paid at replica start."""
        if not self.compile:
            return self
        defaults = self.apply_request_defaults(GenerationRequest(prompt="check"))
        sizes = self.warmup_image_sizes()
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

    def warmup_image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each warm-up run, without repeats: `warmup_size`'s square, then `warmup_sizes`."""
        sizes = [(self.warmup_size, self.warmup_size)] if self.warmup_size else []
        for size in self.warmup_sizes:
            width, height = size.split("x")
            sizes.append((int(width), int(height)))
        return list(dict.fromkeys(sizes))

    def request_defaults_in_effect(self) -> dict:
        """The profile's defaults with `request_defaults` over them, in this service's field names."""
        return {**REQUEST_PROFILES[self.request_profile], **self.request_defaults}

    def apply_request_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """The request as this deployment runs it: the defaults in effect filled in where the client sent
        nothing, then this deployment's limits checked (`max_num_images`: a 422 naming the field)."""
        defaults = self.request_defaults_in_effect()
        missing = {key: value for key, value in defaults.items() if key not in request.model_fields_set}
        request = request.model_copy(update=missing) if missing else request
        if request.num_images > self.max_num_images:
            limit = self.max_num_images
            message = f"Input should be less than or equal to {limit} (this service's max_num_images)"
            raise ValidationFailed(
                [{"type": "less_than_equal", "loc": ["body", "num_images"], "msg": message, "ctx": {"le": limit}}]
            )
        return request
