"""LoRAs and textual-inversion embeddings a request names: fal's fields, what a `path` may be, and the id
that routes a request to the replicas that have its adapters loaded.

A `path` is one of three things and nothing else: an `http(s)` URL (a host of `inputs.url_allowed_hosts`),
a Hugging Face repo id (`owner/name`: its `pytorch_lora_weights.safetensors`, or its one other safetensors
file) or a file in one (`owner/name/dir/file.safetensors`), or a file under `adapters.local_dir`
(`file.safetensors`, `dir/file.safetensors`). Names are looked up on the replica: the local directory
first, then the Hugging Face cache (and the hub, unless `HF_HUB_OFFLINE=1`). Here only the form is checked,
so a path that can never be loaded is a 422 before it is queued.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serve_app.contract.errors import ValidationFailed
from serve_app.host_patterns import host_matches

MAX_LORA_SCALE = 4.0  # fal's LoRA endpoints accept scales from 0 to 4
MAX_ADAPTERS_PER_FIELD = 8  # the schema's bound; `adapters.max_loras` and `max_embeddings` may be lower
DEFAULT_TOKENS = ["<s0>", "<s1>"]  # fal's default for an embedding's tokens
LORA_DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a repo's LoRA
MAX_PATH_CHARS = 2048
ADAPTER_SET_PREFIX = "adapters-"

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._ +-]{0,254}$")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

Token = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]


class LoraWeight(BaseModel):
    """fal's LoRA entry: the weights to apply, and how strongly."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="An http(s) URL, a Hugging Face repo id or file in one (owner/name[/file.safetensors]), or a "
        "file under the service's adapter directory. Safetensors only.",
    )
    scale: float = Field(default=1.0, ge=0.0, le=MAX_LORA_SCALE, allow_inf_nan=False, description="0 to 4.")
    force: bool = Field(default=False, description="Accepted for fal compatibility; not used.")


class Embedding(BaseModel):
    """fal's textual-inversion entry: an SDXL embedding (`clip_l` and `clip_g` vectors) and its tokens."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS, description="As a LoRA's `path`.")
    tokens: list[Token] = Field(
        default_factory=lambda: list(DEFAULT_TOKENS),
        min_length=1,
        max_length=16,
        description="One token per vector of the embedding, to write in the prompt; new to the vocabulary.",
    )


@dataclass(frozen=True)
class AdapterPolicy:
    """Which kinds of `path` this service loads, and how many adapters a request may name."""

    max_loras: int = 3
    max_embeddings: int = 2
    url_hosts: tuple[str, ...] = ()  # empty: URLs are refused
    names: bool = True  # local files and Hugging Face ids


AdapterField = Literal["loras", "embeddings"]


def check_adapters(loras: list[LoraWeight], embeddings: list[Embedding], policy: AdapterPolicy) -> None:
    """A 422 naming the entry for too many adapters, a path of a kind this service does not load, or tokens
    named twice; a path that is well formed may still fail to load (on the replica, also a 422)."""
    errors: list[dict] = []
    for field, entries, limit in (
        ("loras", loras, policy.max_loras),
        ("embeddings", embeddings, policy.max_embeddings),
    ):
        if len(entries) > limit:
            message = (
                f"at most {limit} {field} per request on this service" if limit else f"this service loads no {field}"
            )
            errors.append({"type": "too_long", "loc": ["body", field], "msg": message, "ctx": {"max_length": limit}})
            continue
        for index, entry in enumerate(entries):
            problem = path_problem(entry.path, policy)
            if problem is not None:
                kind, message = problem
                errors.append({"type": kind, "loc": ["body", field, index, "path"], "msg": message})
    tokens = [token for embedding in embeddings for token in embedding.tokens]
    if len(tokens) != len(set(tokens)):
        message = "each embedding token may be named once per request"
        errors.append({"type": "value_error", "loc": ["body", "embeddings"], "msg": message})
    if errors:
        raise ValidationFailed(errors)


def path_problem(path: str, policy: AdapterPolicy) -> tuple[str, str] | None:
    """(error type, message) when `path` is not something this service may load, else None."""
    lowered = path.lower()
    if lowered.startswith(("http://", "https://")):
        host = (urlsplit(path).hostname or "").lower()
        if not policy.url_hosts or not host_matches(host, list(policy.url_hosts)):
            return "adapter_not_allowed", f"this service does not fetch adapters from {host or 'that URL'!r}"
        if urlsplit(path).path.lower().endswith(_PICKLE_SUFFIXES):
            return "adapter_not_safetensors", "only safetensors files are loaded (no pickles)"
        return None
    if "://" in path or path.startswith(("/", "~", "\\")) or "\\" in path or ":" in path:
        return (
            "adapter_not_allowed",
            "a path is an http(s) URL, a Hugging Face id, or a file name under the adapter directory",
        )
    parts = path.split("/")
    if any(part in ("", ".", "..") or not _FILE_PART.match(part) for part in parts):
        return "adapter_not_allowed", f"{path!r} is not a file name or a Hugging Face id"
    if lowered.endswith(_PICKLE_SUFFIXES):
        return "adapter_not_safetensors", "only safetensors files are loaded (no pickles)"
    if not lowered.endswith(".safetensors") and not _REPO_ID.match(path):
        return "adapter_not_allowed", f"{path!r} is neither a .safetensors file nor a Hugging Face repo id (owner/name)"
    if not policy.names:
        return "adapter_not_allowed", "this service loads adapters by URL only"
    return None


def adapter_set_id(loras: tuple[LoraWeight, ...], embeddings: tuple[Embedding, ...], runner_hint: str = "") -> str:
    """The multiplexed model id a request is routed by: its adapters' paths (not their scales: one loaded LoRA
    serves every scale) and the client's `X-Fal-Runner-Hint`. Empty when there is neither."""
    if not loras and not embeddings and not runner_hint:
        return ""
    key = {
        "loras": sorted({lora.path for lora in loras}),
        "embeddings": sorted({(embedding.path, *embedding.tokens) for embedding in embeddings}),
        "hint": runner_hint,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"{ADAPTER_SET_PREFIX}{digest}"
