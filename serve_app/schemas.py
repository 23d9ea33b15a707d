"""The fal wire format in one place: request, image, stream events, result and errors.

The ingress validates requests against these models at the HTTP boundary. Events are built as
these models by their producers (the SDXL replica) and cross the process boundary to the ingress
as their plain `model_dump()` dicts, which the ingress relays without validating them again.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript too) keeps exact
MAX_PROMPT_CHARS = 2000
MIN_SIDE, MAX_SIDE = 128, 2048

ImageSide = Annotated[
    int,
    Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="Pixels; a multiple of 8."),
]


class GenerationRequest(BaseModel):
    """What a client asks for; fal's SDXL streaming example's fields plus `guidance_scale`."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field is an error, not silently ignored
        strict=True,  # "20" is not a step count; JSON numbers and strings keep their types
        json_schema_extra={
            "examples": [{"prompt": "a red fox", "num_inference_steps": 20, "width": 512, "height": 512, "seed": 42}]
        },
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="blurry, low quality", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=20, ge=1, le=50)
    width: ImageSide = 1024
    height: ImageSide = 1024
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random when omitted; returned.")
    guidance_scale: float = Field(default=7.5, ge=0.0, le=20.0, allow_inf_nan=False)
    preview_interval: int | None = Field(
        default=None, ge=1, le=50, description="Steps between previews; the service's default when omitted."
    )
    output_format: Literal["jpeg", "png"] = Field(default="jpeg", description="Format of the final image.")
    sync_mode: bool = Field(
        default=False,
        description="Queue results: images inline as data URIs when true, else URLs served by this service "
        "while the job is kept (fal's default). The run and stream routes always answer inline.",
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


class ImageFile(BaseModel):
    """An image inline as a data URI: what fal's playground and clients render."""

    url: str
    content_type: Literal["image/jpeg", "image/png"]
    width: int
    height: int


class Timings(BaseModel):
    """Seconds spent; `inference` is the pipeline call, `total` includes encoding."""

    inference: float
    total: float


class PreviewEvent(BaseModel):
    """A TAESD decode of the latents after `step` (0-based) of `num_inference_steps`."""

    type: Literal["preview"] = "preview"
    step: int
    num_inference_steps: int
    image: ImageFile


class ProgressEvent(BaseModel):
    """Denoising `step` (0-based) finished; sent only to callers that ask for it (the job queue's logs)."""

    type: Literal["progress"] = "progress"
    step: int
    num_inference_steps: int


class GenerationResult(BaseModel):
    """`POST /`: fal fast-sdxl's result shape."""

    images: list[ImageFile]
    seed: int
    timings: Timings
    prompt: str


class FinalEvent(GenerationResult):
    """The last event of a successful stream: the result plus `image`, the streaming example's shape
    (`image` and `images[0]` name the same file)."""

    type: Literal["final"] = "final"
    image: ImageFile

    def result(self) -> GenerationResult:
        return GenerationResult.model_validate(self.model_dump(include=set(GenerationResult.model_fields)))


class ErrorBody(BaseModel):
    """The one error shape, for HTTP errors and the SSE `error` event alike."""

    detail: str | list
    error_type: str


class ErrorEvent(ErrorBody):
    """The last event of a failed stream; SSE sends it as `event: error` with an `ErrorBody`."""

    type: Literal["error"] = "error"


StreamEvent = Annotated[PreviewEvent | ProgressEvent | FinalEvent | ErrorEvent, Field(discriminator="type")]
