"""An image request's URLs to checked images, and the request resolved with them: every way fal's clients
send a file. A data URI is decoded; a URL of this service's own files (a result's `/files/...`, an
upload's `file_url`) is read from the object store with no network round trip (an upload only by the
key that uploaded it); any other http(s) URL is fetched with `serve_app.inputs.fetch`'s care. Each
image is then checked (`serve_app.inputs.images`) on a thread: decoding is CPU work the event loop
must not do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from serve_app.config import InputConfig
from serve_app.contract.requests import (
    SIZE_FIELDS,
    ImageToImageRequest,
    InpaintingRequest,
    RequestPolicy,
    ResolvedRequest,
)
from serve_app.inputs.fetch import FetchPolicy, FetchRefused, fetch_url
from serve_app.inputs.images import CheckedImage, check_image, fitted_size, input_error
from serve_app.inputs.uploads import owner_tag, upload_owner_tag
from serve_app.queue.outputs import OutputStore

DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.IGNORECASE)
MAX_URL_CHARS = 8192  # an http(s) URL; data URIs are bounded by the body limit
DATA_URI_HEADER_CHARS = 256  # the header is matched within this prefix: never a regex over megabytes
FILES_PREFIX = "/files/"


@dataclass(frozen=True)
class Caller:
    """Who sent the request, as the HTTP side knows it: whose uploads it may use, and the host and path
    prefix it called the app at (a `/files/...` URL there is one of ours)."""

    owner: str
    host: str
    root_path: str = ""


class ImageInputs:
    def __init__(self, config: InputConfig, outputs: OutputStore) -> None:
        self._config = config
        self._outputs = outputs
        self._fetch = FetchPolicy(
            allowed_hosts=config.url_allowed_hosts,
            allow_private_networks=config.url_allow_private_networks,
            timeout_s=config.url_timeout_s,
            max_bytes=config.max_image_bytes,
        )

    async def resolve(
        self, body: ImageToImageRequest, policy: RequestPolicy, caller: Caller, runner_hint: str = ""
    ) -> ResolvedRequest:
        """The request with its image (and mask) loaded and checked; its size the image's unless it names one."""
        loads = [self.load(body.image_url, "image_url", caller)]
        if isinstance(body, InpaintingRequest):
            loads.append(self.load(body.mask_url, "mask_url", caller))
        image, *mask = await asyncio.gather(*loads)
        images = {"image": image.data, **({"mask": mask[0].data} if mask else {})}
        # The input's size when the request names none (fitted to the service's sides); its aspect otherwise.
        named = SIZE_FIELDS & body.model_fields_set
        size = fitted_size(image) if not named else (image.width, image.height)
        return policy.resolve(body, size, runner_hint, **images)

    async def load(self, url: str, field: str, caller: Caller) -> CheckedImage:
        limits = (self._config.max_image_bytes, self._config.max_image_pixels)
        if url[:5].lower() == "data:":  # decoded and checked on a thread: tens of megabytes of base64
            return await asyncio.to_thread(lambda: check_image(self._data_uri(url, field), field, *limits))
        data = await self._bytes(url, field, caller)
        return await asyncio.to_thread(check_image, data, field, *limits)

    async def _bytes(self, url: str, field: str, caller: Caller) -> bytes:
        if len(url) > MAX_URL_CHARS:
            raise input_error(field, "file_download_error", f"{field} is longer than {MAX_URL_CHARS} characters")
        parts = urlsplit(url)
        ours = not parts.scheme and not parts.netloc or parts.netloc.lower() == caller.host.lower()
        files_prefix = caller.root_path.rstrip("/") + FILES_PREFIX
        if ours and parts.path.startswith(files_prefix):
            return await self._own_file(unquote(parts.path[len(files_prefix) :]), field, caller)
        if parts.scheme.lower() not in ("http", "https"):
            message = f"{field} must be a data URI or an http(s) URL"
            raise input_error(field, "file_download_error", message)
        try:
            return await fetch_url(url, self._fetch)
        except FetchRefused as refused:
            raise input_error(field, refused.kind, refused.message) from refused

    def _data_uri(self, url: str, field: str) -> bytes:
        header = DATA_URI.match(url[:DATA_URI_HEADER_CHARS])
        if header is None:
            raise input_error(field, "image_load_error", "a data URI must be base64: data:image/png;base64,...")
        encoded = url[header.end() :]
        if len(encoded) * 3 // 4 > self._config.max_image_bytes:
            limit = self._config.max_image_bytes
            raise input_error(field, "file_too_large", f"the image is over {limit} bytes", max_bytes=limit)
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as error:
            raise input_error(field, "image_load_error", "the data URI's base64 is not valid") from error

    async def _own_file(self, key: str, field: str, caller: Caller) -> bytes:
        """A file this service stored, read from the store; another key's upload is as unknown as a
        missing file (no hint that it exists)."""
        tag = upload_owner_tag(key)
        found = None if tag is not None and tag != owner_tag(caller.owner) else await self._outputs.get(key)
        if found is None:
            message = "no such file on this service for this key (or it has expired)"
            raise input_error(field, "file_download_error", message)
        return found[0]
