"""Typed failures raised inside the service; the edges translate them to `ErrorBody`."""

from __future__ import annotations


class GenerationError(Exception):
    """A generation failed; `error_type` is what clients see (the ingress maps it to `POST /`'s status)."""

    error_type = "generation_failed"

    def to_event(self) -> dict:
        return {"detail": str(self) or self.error_type, "error_type": self.error_type}


class DeadlineExceeded(GenerationError):
    error_type = "deadline_exceeded"


class GenerationCancelled(Exception):
    """The client went away; raised inside the pipeline to stop denoising at the next step."""
