"""A generation's events and result: what the engine yields, the SSE stream carries and `POST /` returns.

`RunMode` is what a caller asks the engine for besides the result: previews (streams), progress
(queue jobs' logs), or neither (`POST /`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from serve_app.contract.errors import ErrorBody


@dataclass(frozen=True)
class RunMode:
    previews: bool
    progress: bool


STREAM = RunMode(previews=True, progress=False)  # POST /stream
RESULT_ONLY = RunMode(previews=False, progress=False)  # POST /
QUEUE_JOB = RunMode(previews=False, progress=True)  # a queue job: a log line per step
WATCHED_QUEUE_JOB = RunMode(previews=True, progress=True)  # ...and previews for its viewers (queue.previews)


class ImageFile(BaseModel):
    """An image as fal's clients read it: a data URI (or a URL for stored queue results)."""

    url: str
    content_type: Literal["image/jpeg", "image/png"]
    width: int
    height: int


class Timings(BaseModel):
    """Seconds spent; `inference` is the pipeline call, `total` includes encoding."""

    inference: float
    total: float


class PreviewEvent(BaseModel):
    """A TAESD decode of the latents after `step` (0-based) of `num_inference_steps`; for a batch
    (`num_images` > 1), of its first image: the one the final event's `image` names."""

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
    seed: int = Field(description="The request's seed (chosen when omitted); image i was generated from seed + i.")
    timings: Timings
    prompt: str
    has_nsfw_concepts: list[bool | None] = Field(
        description="One per image: true when the safety checker flagged it (the image is then black), false "
        "when it passed, null when no check ran (no checker configured, or `enable_safety_checker: false`)."
    )


class FinalEvent(GenerationResult):
    """The last event of a successful stream: the result plus `image`, the streaming example's shape
    (`image` and `images[0]` name the same file)."""

    type: Literal["final"] = "final"
    image: ImageFile

    def result(self) -> GenerationResult:
        return GenerationResult.model_validate(self.model_dump(include=set(GenerationResult.model_fields)))


class ErrorEvent(ErrorBody):
    """How a model replica reports a failed generation to its caller; the generation client raises it
    as its catalog error. Clients never see this model: SSE sends an `ErrorBody` as `event: error`."""

    type: Literal["error"] = "error"


StreamEvent = PreviewEvent | ProgressEvent | FinalEvent
ReplicaEvent = Annotated[PreviewEvent | ProgressEvent | FinalEvent | ErrorEvent, Field(discriminator="type")]
