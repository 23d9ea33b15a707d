"""What a client asks for (`GenerationRequest`, fal's fields and ours; `ImageToImageRequest` and
`InpaintingRequest` for fast-sdxl's other two endpoints) and what the engine runs (`ResolvedRequest`:
every default applied, the seed chosen, input images as checked bytes). `RequestPolicy.resolve` is the one
place a request becomes runnable, so no entry point can forget the service's defaults or limits.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serve_app.contract.adapters import (
    MAX_ADAPTERS_PER_FIELD,
    AdapterPolicy,
    Embedding,
    LoraWeight,
    adapter_set_id,
    check_adapters,
)
from serve_app.contract.errors import ValidationFailed

MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript too) keeps exact
RANDOM_SEEDS = 2**32  # a seed chosen for the client is below this
MAX_PROMPT_CHARS = 2000
MIN_SIDE, MAX_SIDE = 128, 2048
MAX_NUM_IMAGES = 8  # fal fast-sdxl's limit; a deployment may cap it lower (`max_num_images`)
# Pixels one request may generate (width x height x num_images), by default: 8 images at 1024x1024, 4 at
# 2048x2048. fal allows 8 at 2048x2048 (33.5 M), past where one kernel launch of the VAE fits.
MAX_BATCH_PIXELS = 4 * MAX_SIDE * MAX_SIDE
DEFAULT_PREVIEW_INTERVAL = 5
DEFAULT_STRENGTH = 0.95  # fal fast-sdxl image-to-image's and inpainting's
MAX_IMAGE_URL_CHARS = 64 * 1024 * 1024  # a data URI of an 8-megapixel PNG; the body limit binds first

Task = Literal["text-to-image", "image-to-image", "inpainting"]

# fal fast-sdxl's `image_size` presets: (width, height).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
ImageSizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
OutputFormat = Literal["jpeg", "png"]

# fal fast-sdxl's defaults for the fields a client leaves out: the `fast-sdxl` request profile.
FAST_SDXL_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 25,
    "guidance_scale": 7.5,
    "negative_prompt": "",
    "image_size": "square_hd",
    "format": "jpeg",
}


def _integral_number(value: Any) -> Any:
    """JSON has one number type: `42.0` is the integer 42 (Python's `json.dumps(42.0)` sends it so).
    `42.5`, `true` and `"42"` are left as they are, for strict validation to reject."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_number)]
ImageSide = Annotated[
    JsonInt,
    Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="Pixels; a multiple of 8."),
]


class ImageSize(BaseModel):
    """fal's custom `image_size`: `{width, height}` (each 512 when omitted, as fal's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    width: ImageSide = 512
    height: ImageSide = 512


class GenerationRequest(BaseModel):
    """What a client asks for: fal's SDXL streaming example's fields, and fal fast-sdxl's request.

    fal's names are accepted beside ours and resolved once, here: `image_size` sets `width` and
    `height`, `format` sets `output_format` (marked as sent, so request defaults never replace them),
    and the validated request carries only our spelling (`image_size` and `format` are then None).
    """

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field is an error, not silently ignored
        strict=True,  # "20" is not a step count; JSON numbers and strings keep their types
        json_schema_extra={
            "examples": [
                {"prompt": "a red fox", "num_inference_steps": 20, "width": 512, "height": 512, "seed": 42},
                {"prompt": "a red fox", "image_size": "square", "num_images": 2, "format": "png", "seed": 42},
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="blurry, low quality", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: JsonInt = Field(default=20, ge=1, le=50)
    image_size: ImageSizePreset | ImageSize | None = Field(
        default=None,
        description="fal's size: a preset (square_hd 1024x1024, square 512x512, portrait_4_3 768x1024, "
        "portrait_16_9 576x1024, landscape_4_3 1024x768, landscape_16_9 1024x576) or {width, height}. "
        "Sets `width` and `height`; sending either of those too is a 422 unless they agree.",
    )
    width: ImageSide = 1024
    height: ImageSide = 1024
    seed: JsonInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Random when omitted; returned. Image i of a batch is generated from seed + i.",
    )
    guidance_scale: float = Field(default=7.5, ge=0.0, le=20.0, allow_inf_nan=False)
    num_images: JsonInt = Field(
        default=1,
        ge=1,
        le=MAX_NUM_IMAGES,
        description="Images generated together in one batched pipeline call; the service may cap it lower.",
    )
    preview_interval: JsonInt | None = Field(
        default=None, ge=1, le=50, description="Steps between previews; the service's default when omitted."
    )
    format: OutputFormat | None = Field(
        default=None, description="fal's name for `output_format`; sending both is a 422 unless they agree."
    )
    output_format: OutputFormat = Field(default="jpeg", description="Format of the final images.")
    sync_mode: bool = Field(
        default=False,
        description="Queue results: images inline as data URIs when true, else URLs served by this service "
        "while the job is kept (fal's default). The run and stream routes always answer inline.",
    )
    enable_safety_checker: bool = Field(
        default=True,
        description="Run the deployment's safety checker, if it has one (`safety_checker`): flagged images "
        "are replaced by black ones and `has_nsfw_concepts` says which. Without one nothing is checked and "
        "`has_nsfw_concepts` is null per image.",
    )
    safety_checker_version: Literal["v1", "v2"] = Field(
        default="v1", description="Accepted for fal compatibility; the deployment's configured checker runs either way."
    )
    request_id: str = Field(default="", max_length=256, description="Accepted for fal compatibility; not used.")
    expand_prompt: bool = Field(default=False, description="fal's prompt expansion: not supported, only false.")
    loras: list[LoraWeight] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS_PER_FIELD,
        description="LoRAs applied to this request only, each at its `scale`; the service may allow fewer.",
    )
    embeddings: list[Embedding] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS_PER_FIELD,
        description="Textual-inversion embeddings for this request only: write their `tokens` in the prompt.",
    )

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _valid_unicode(cls, text: str) -> str:
        try:
            text.encode("utf-8")  # JSON can carry lone surrogates ("\\ud800"), which cannot be encoded
        except UnicodeEncodeError as error:
            raise ValueError("must be valid Unicode (no lone surrogates)") from error
        return text

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return prompt

    @field_validator("width", "height")
    @classmethod
    def _side_agrees_with_image_size(cls, side: int, info: ValidationInfo) -> int:
        """Runs only for a side the client sent (defaults are not validated)."""
        image_size = info.data.get("image_size")
        if image_size is not None:
            expected = dict(zip(("width", "height"), image_size_pixels(image_size), strict=True))[info.field_name]
            if side != expected:
                raise ValueError(f"{info.field_name} {side} disagrees with image_size ({expected}); send one of them")
        return side

    @field_validator("output_format")
    @classmethod
    def _agrees_with_format(cls, output_format: str, info: ValidationInfo) -> str:
        chosen = info.data.get("format")
        if chosen is not None and chosen != output_format:
            raise ValueError(f"output_format {output_format!r} disagrees with format {chosen!r}; send one of them")
        return output_format

    @field_validator("expand_prompt")
    @classmethod
    def _no_prompt_expansion(cls, expand: bool) -> bool:
        if expand:
            raise ValueError("expand_prompt is not supported by this service; send false or leave it out")
        return expand

    @model_validator(mode="after")
    def _fal_names_resolved(self) -> GenerationRequest:
        """`image_size` -> `width`/`height` and `format` -> `output_format`, recorded as sent by the client."""
        if self.image_size is not None:
            self.width, self.height = image_size_pixels(self.image_size)
            self.image_size = None
            self.__pydantic_fields_set__.update({"width", "height"})
        if self.format is not None:
            self.output_format = self.format
            self.format = None
            self.__pydantic_fields_set__.add("output_format")
        return self


class ImageToImageRequest(GenerationRequest):
    """fal fast-sdxl's image-to-image: every text-to-image field, and the image to start from. The output
    takes the input's size (within the service's limits) unless `image_size` (or `width` and `height`)
    is sent."""

    image_url: str = Field(
        min_length=1,
        max_length=MAX_IMAGE_URL_CHARS,
        description="The image: a data URI, an http(s) URL (hosts the service allows), or a URL this service "
        "gave (a result's `/files/...`, an upload's `file_url`). PNG, JPEG or WebP.",
    )
    strength: float = Field(
        default=DEFAULT_STRENGTH,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="How much to change the image: 1 ignores it; the steps run are strength x num_inference_steps.",
    )
    task: ClassVar[Task] = "image-to-image"


class InpaintingRequest(ImageToImageRequest):
    """fal fast-sdxl's inpainting: image-to-image within a mask (white repaints, black keeps)."""

    mask_url: str = Field(
        min_length=1,
        max_length=MAX_IMAGE_URL_CHARS,
        description="The mask, as `image_url`; white is repainted. Resized to the image's size if it differs.",
    )
    task: ClassVar[Task] = "inpainting"


class ResolvedRequest(BaseModel):
    """A request as the engine runs it: the service's defaults applied and its limits checked, the seed
    chosen. Only `RequestPolicy.resolve` makes one from a client's request; the engine takes nothing else.
    A queued job stores this, so a retried job runs with the same seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    width: int
    height: int
    seed: int = Field(description="Image i of a batch is generated from seed + i.")
    guidance_scale: float
    num_images: int
    preview_interval: int = Field(description="Steps between previews when the caller asks for previews.")
    output_format: OutputFormat
    sync_mode: bool = False
    enable_safety_checker: bool = True
    task: Task = "text-to-image"
    strength: float = Field(default=1.0, description="Image to image and inpainting: how much to change the image.")
    image: bytes | None = Field(default=None, description="The input image's file (checked), for image tasks.")
    mask: bytes | None = Field(default=None, description="The inpainting mask's file (checked).")
    loras: tuple[LoraWeight, ...] = ()
    embeddings: tuple[Embedding, ...] = ()
    runner_hint: str = Field(default="", description="`X-Fal-Runner-Hint`: requests with the same hint go together.")

    @property
    def adapter_set_id(self) -> str:
        """The multiplexed model id this request is routed by (empty: any replica)."""
        return adapter_set_id(self.loras, self.embeddings, self.runner_hint)

    @property
    def denoising_steps(self) -> int:
        """Steps the pipeline really runs: image tasks start part-way, at `strength`."""
        return denoising_steps(self.num_inference_steps, self.strength)


RUN_FIELDS = frozenset(ResolvedRequest.model_fields) - {
    *("seed", "preview_interval", "task", "strength", "image", "mask", "loras", "embeddings", "runner_hint")
}
MAX_RUNNER_HINT_CHARS = 256
SIZE_FIELDS = frozenset({"width", "height"})


class RequestPolicy(BaseModel):
    """The service's defaults for fields a client leaves out, and its limits: built once from the config."""

    model_config = ConfigDict(frozen=True)

    defaults: dict[str, Any] = Field(default_factory=dict, description="Field values in this service's names.")
    preview_interval: int = DEFAULT_PREVIEW_INTERVAL
    max_num_images: int = MAX_NUM_IMAGES
    max_batch_pixels: int = MAX_BATCH_PIXELS
    adapters: AdapterPolicy = AdapterPolicy()

    def resolve(
        self,
        request: GenerationRequest,
        input_size: tuple[int, int] | None = None,
        runner_hint: str = "",
        **images: bytes,
    ) -> ResolvedRequest:
        """The request as the engine runs it: what the client sent, else the defaults (a random seed when
        neither has one); a 422 naming the field for a limit of this deployment's (`max_num_images`).

        An image task's size is `input_size` (the input image's, fitted to the service's sides) unless
        the client sent one (one side sent: the other keeps the input's aspect); the defaults' size does
        not apply. `images` are its checked `image`/`mask`; `runner_hint` the client's `X-Fal-Runner-Hint`."""
        sent = request.model_fields_set
        check_adapters(request.loras, request.embeddings, self.adapters)
        fields = {name: getattr(request, name) for name in RUN_FIELDS}
        defaults = {name: value for name, value in self.defaults.items() if name not in sent and name in fields}
        if input_size is not None:
            defaults = {name: value for name, value in defaults.items() if name not in SIZE_FIELDS}
            if not SIZE_FIELDS & sent:
                fields["width"], fields["height"] = input_size
            elif SIZE_FIELDS & sent != SIZE_FIELDS:
                fields["width"], fields["height"] = _other_side_by_aspect(fields, sent, input_size)
        fields.update(defaults)
        if isinstance(request, ImageToImageRequest):
            fields.update(task=request.task, strength=request.strength, **images)
            if denoising_steps(fields["num_inference_steps"], request.strength) < 1:
                message = "strength x num_inference_steps is under one step: raise either"
                raise ValidationFailed([{"type": "greater_than_equal", "loc": ["body", "strength"], "msg": message}])
        if fields["num_images"] > self.max_num_images:
            limit = self.max_num_images
            message = f"Input should be less than or equal to {limit} (this service's max_num_images)"
            raise ValidationFailed(
                [{"type": "less_than_equal", "loc": ["body", "num_images"], "msg": message, "ctx": {"le": limit}}]
            )
        batch_pixels = fields["width"] * fields["height"] * fields["num_images"]
        if batch_pixels > self.max_batch_pixels:
            limit = self.max_batch_pixels
            message = (
                f"width x height x num_images is {batch_pixels}, over this service's max_batch_pixels ({limit}): "
                "ask for fewer or smaller images"
            )
            raise ValidationFailed(
                [{"type": "less_than_equal", "loc": ["body", "num_images"], "msg": message, "ctx": {"le": limit}}]
            )
        fields["preview_interval"] = (
            request.preview_interval or self.defaults.get("preview_interval") or self.preview_interval
        )
        chosen_seed = request.seed if request.seed is not None else self.defaults.get("seed")
        fields["seed"] = chosen_seed if chosen_seed is not None else secrets.randbelow(RANDOM_SEEDS)
        fields.update(
            loras=tuple(request.loras),
            embeddings=tuple(request.embeddings),
            runner_hint=runner_hint[:MAX_RUNNER_HINT_CHARS],
        )
        return ResolvedRequest(**fields)


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """Steps an image pipeline runs at `strength`, as diffusers counts them (all of them at 1, text to image's)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def _other_side_by_aspect(fields: dict, sent: set[str], input_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) when a client sent one side of an image task's size: the other from the input's aspect,
    a multiple of 8 within the service's sides."""
    in_width, in_height = input_size
    if "width" in sent:
        height = round(fields["width"] * in_height / in_width / 8) * 8
        return fields["width"], min(max(height, MIN_SIDE), MAX_SIDE)
    width = round(fields["height"] * in_width / in_height / 8) * 8
    return min(max(width, MIN_SIDE), MAX_SIDE), fields["height"]


def image_size_pixels(image_size: ImageSizePreset | ImageSize) -> tuple[int, int]:
    """(width, height) of a fal `image_size`: a preset's, or the object's own."""
    if isinstance(image_size, ImageSize):
        return image_size.width, image_size.height
    return IMAGE_SIZE_PRESETS[image_size]


def resolved_request_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Request fields (defaults, a profile) validated and in this service's names: fal's `image_size`
    and `format` become `width`, `height` and `output_format`. Raises `ValidationError` for a bad one."""
    request = GenerationRequest.model_validate({"prompt": "check", **fields})
    chosen = request.model_fields_set - {"image_size", "format"} - ({"prompt"} - fields.keys())
    return request.model_dump(include=chosen)


# Defaults to start from (config `requests.profile`), before the deployment's own `requests.defaults`.
REQUEST_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},  # the schema's: 20 steps, negative prompt "blurry, low quality", 1024x1024, JPEG
    "fast-sdxl": resolved_request_fields(FAST_SDXL_DEFAULTS),
}
