"""fal's upload protocol, served here: what `@fal-ai/client` does with a `Blob` or `File` input before it
submits (`fal.storage.upload`), so its uploads stay on this service rather than go to fal under the key.

`POST /storage/upload/initiate` with `{content_type, file_name}` answers `{upload_url, file_url}`; the
client then `PUT`s the bytes to `upload_url` (an absolute URL of this service: the JS client sends that
request without its middleware, and without a key, so the URL's unguessable token is the permission,
as a presigned URL's is) and puts `file_url` in its input. Uploads live in the outputs' object store
under keys that name their owner (`up-<owner tag><secret>`): only the key that uploaded a file may use
it as an input, and it expires after `inputs.upload_expiration_s`. `initiate` leaves an empty object at
the key, and a `PUT` is taken only where one waits: a URL nobody was given (another expiry, another
name) stores nothing, and every stored upload expires.
"""

from __future__ import annotations

import asyncio
import hashlib

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import InputConfig
from serve_app.contract.errors import NotFound
from serve_app.inputs.images import FORMATS, check_image, input_error
from serve_app.queue.outputs import OutputStore, extension

UPLOAD_MARK = "up-"
OWNER_TAG_CHARS = 16
CONTENT_TYPES = frozenset(FORMATS.values())


class UploadInitiate(BaseModel):
    """What `fal.storage.upload` sends first."""

    model_config = ConfigDict(extra="ignore")

    content_type: str = Field(max_length=100)
    file_name: str = Field(default="upload", max_length=1000)


class UploadTarget(BaseModel):
    upload_url: str = Field(description="Where to PUT the bytes (no key needed: the URL is the permission).")
    file_url: str = Field(description="The file's URL, to send as an image input (by the key that uploaded it).")


def owner_tag(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:OWNER_TAG_CHARS]


def upload_owner_tag(key: str) -> str | None:
    """The owner tag an upload's key carries (`<expires_at>.up-<tag><secret>/<name>`); None for other files."""
    secret = key.partition("/")[0].partition(".")[2]
    if not secret.startswith(UPLOAD_MARK):
        return None
    return secret[len(UPLOAD_MARK) : len(UPLOAD_MARK) + OWNER_TAG_CHARS]


class Uploads:
    def __init__(self, outputs: OutputStore, config: InputConfig) -> None:
        self._outputs = outputs
        self._config = config

    async def initiate(self, body: UploadInitiate, owner: str, base_url: str) -> UploadTarget:
        """Where to send the bytes and the URL they will have; an empty object marks the upload as given."""
        content_type = body.content_type.split(";")[0].strip().lower()
        if content_type not in CONTENT_TYPES:
            message = f"uploads are images: content_type must be one of {sorted(CONTENT_TYPES)}"
            raise input_error("content_type", "unsupported_image_format", message)
        token = self._outputs.new_token(self._config.upload_expiration_s, UPLOAD_MARK + owner_tag(owner))
        key = f"{token}/0.{extension(content_type)}"
        await self._outputs.put_at(key, b"", content_type)  # pending: the one key a PUT may fill
        base = base_url.rstrip("/")
        return UploadTarget(upload_url=f"{base}/storage/upload/{key}", file_url=f"{base}/files/{key}")

    async def receive(self, key: str, data: bytes) -> None:
        """The PUT of an upload's bytes: once, within its expiry, an image within the limits."""
        if upload_owner_tag(key) is None or not await self._fresh(key):
            raise NotFound("no such upload, or it has expired or already arrived")
        limits = (self._config.max_image_bytes, self._config.max_image_pixels)
        checked = await asyncio.to_thread(check_image, data, "body", *limits)  # decodes: off the event loop
        await self._outputs.put_at(key, data, checked.content_type)

    async def _fresh(self, key: str) -> bool:
        """Given by `initiate` (its empty object is there), not expired, and not filled yet."""
        return self._outputs.is_live_key(key) and await self._outputs.size(key) == 0
