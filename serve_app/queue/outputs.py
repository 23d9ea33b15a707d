"""Where queue results' images live: an object store, never Redis (which keeps job state and small results).

Through obstore (one maintained library, Rust's `object_store`, async and with presigning built in) a
local directory is the embedded default and any S3-compatible store serves production: `queue.outputs_url`
is `s3://bucket/prefix` there, with the endpoint, region and credentials from the standard `AWS_*`
environment (a Secret). fsspec + s3fs would do too, but drags aiobotocore's pinned botocore along.

An object's key starts with when it expires: `<expires_at>/<secret>/<i>.<ext>`, `never/...` for none.
File URLs carry that key (`/files/<expires_at>.<secret>/<i>.<ext>`), so serving a file needs no lookup,
an expired one answers 404 before the sweep has run, and the sweep deletes whole expired prefixes
without any index (in Redis or elsewhere) that a fault could lose.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Literal

import obstore
from obstore.store import LocalStore, MemoryStore, ObjectStore, from_url

from serve_app.config import QueueConfig, cache_root
from serve_app.contract.errors import ValidationFailed

logger = logging.getLogger("ray.serve")

NEVER = "never"
EXPIRY_GRAIN_S = 60  # expiries round up to the minute: one prefix per minute, not per job...
SHORT_LIFE_S = 600  # ...but to the second for files asked to live less than this
PRESIGN_MAX_S = 7 * 24 * 3600  # S3's SigV4 limit on a presigned URL's life
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
SECRET = re.compile(r"[A-Za-z0-9_-]{16,64}")
NAME = re.compile(r"\d{1,3}\.[a-z]{3,4}")
KeepFor = float | None | Literal["default"]  # seconds, None for as long as allowed, or the configured default


class OutputStore:
    def __init__(
        self,
        store: ObjectStore,
        config: QueueConfig,
        presign: bool = False,
        describe: str = "in memory",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self._default_s = config.outputs_default_expiration_s
        self._max_s = config.outputs_max_expiration_s
        self._presign = presign
        self.describe = describe

    @classmethod
    def open(cls, config: QueueConfig) -> OutputStore:
        """The store `queue.outputs_url` names: `s3://...` (or any URL obstore knows), else a directory
        (by default `outputs` beside the model cache)."""
        url = config.outputs_url
        if url and "://" in url and not url.startswith("file://"):
            options = {"allow_http": True} if os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true" else None
            return cls(from_url(url, client_options=options), config, config.outputs_presigned_urls, url)
        directory = Path(url.removeprefix("file://")) if url else cache_root() / "outputs"
        store = LocalStore(directory, automatic_cleanup=True, mkdir=True)
        return cls(store, config, describe=str(directory))

    @classmethod
    def in_memory(cls, config: QueueConfig | None = None, clock: Callable[[], float] = time.time) -> OutputStore:
        return cls(MemoryStore(), config or QueueConfig(), clock=clock)

    def keep_for(self, requested: KeepFor) -> float | None:
        """Seconds a job's files are kept: what it asked for, within the configured maximum (None: no end)."""
        wanted = self._default_s if requested == "default" else requested
        if wanted is None:
            return self._max_s
        return wanted if self._max_s is None else min(wanted, self._max_s)

    def new_token(self, keep_s: float | None, secret_prefix: str = "") -> str:
        """A fresh `<expires_at>.<secret>` for files kept `keep_s` seconds (None: no end)."""
        expires_at = NEVER
        if keep_s is not None:
            grain = 1 if keep_s < SHORT_LIFE_S else EXPIRY_GRAIN_S
            expires_at = str(math.ceil((self._clock() + keep_s) / grain) * grain)
        return f"{expires_at}.{secret_prefix}{secrets.token_urlsafe(18)}"

    async def put_at(self, key: str, data: bytes, content_type: str) -> None:
        """Store one file at its URL key (`<token>/<name>`, see `new_token`)."""
        path = _path(key)
        if path is None:
            raise ValueError(f"not a file key: {key!r}")
        attributes = {"Content-Type": content_type} if not isinstance(self._store, LocalStore) else None
        await obstore.put_async(self._store, path, data, attributes=attributes)

    def is_live_key(self, key: str) -> bool:
        """A well-formed file key whose expiry has not passed."""
        path = _path(key)
        return path is not None and not self._expired(path.split("/", 1)[0])

    async def size(self, key: str) -> int | None:
        """The stored file's size in bytes; None when there is none."""
        path = _path(key)
        if path is None:
            return None
        try:
            meta = await obstore.head_async(self._store, path)
        except FileNotFoundError:
            return None
        return int(meta["size"])

    async def delete(self, keys: list[str]) -> None:
        """Delete files by key (those already gone, or malformed, are skipped)."""
        paths = [path for key in keys if (path := _path(key)) is not None]
        if paths:
            await obstore.delete_async(self._store, paths)

    async def put(self, keep_s: float | None, images: list[tuple[bytes, str]], presign: bool = True) -> list[str]:
        """Store one result's images (bytes, content type); their URLs: `/files/...` paths the app serves,
        or presigned URLs of the store where configured (and `presign`)."""
        token = self.new_token(keep_s)
        keys = []
        for index, (data, content_type) in enumerate(images):
            key = f"{token}/{index}.{extension(content_type)}"
            await self.put_at(key, data, content_type)
            keys.append(key)
        if not (self._presign and presign):
            return [f"/files/{key}" for key in keys]
        life = PRESIGN_MAX_S if keep_s is None else min(max(keep_s, 1.0), PRESIGN_MAX_S)
        return list(await obstore.sign_async(self._store, "GET", [_path(k) for k in keys], timedelta(seconds=life)))

    async def get(self, key: str) -> tuple[bytes, str] | None:
        """A stored file by its URL key (`<token>/<name>`); None when unknown, malformed or expired."""
        path = _path(key)
        if path is None or self._expired(path.split("/", 1)[0]):
            return None
        try:
            found = await obstore.get_async(self._store, path)
        except FileNotFoundError:
            return None
        data = bytes(await found.bytes_async())
        if not data:
            return None  # an upload given out whose bytes have not arrived
        return data, CONTENT_TYPES.get(path.rsplit(".", 1)[-1], "application/octet-stream")

    async def sweep(self) -> int:
        """Delete every object whose expiry has passed; the number deleted. Safe on every replica at once."""
        listing = await obstore.list_with_delimiter_async(self._store)
        deleted = 0
        for prefix in listing["common_prefixes"]:
            if prefix == NEVER or not self._expired(prefix):
                continue
            paths = [meta["path"] async for batch in obstore.list(self._store, prefix + "/") for meta in batch]
            if paths:
                await obstore.delete_async(self._store, paths)
                deleted += len(paths)
        return deleted

    def _expired(self, expires_at: str) -> bool:
        return expires_at != NEVER and (not expires_at.isdigit() or int(expires_at) <= self._clock())


def extension(content_type: str) -> str:
    """A file name's extension for a content type this store serves (`image/png` -> `png`)."""
    return content_type.split("/")[1]


def parse_lifecycle(header: str | None) -> KeepFor:
    """fal's `X-Fal-Object-Lifecycle-Preference: {"expiration_duration_seconds": N}`; `null` asks for as
    long as allowed; no header for the configured default."""
    if header is None:
        return "default"
    try:
        preference = json.loads(header)
        seconds = preference["expiration_duration_seconds"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValidationFailed(
            'X-Fal-Object-Lifecycle-Preference must be JSON like {"expiration_duration_seconds": 3600}'
        ) from error
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 1 <= seconds <= 100 * 365 * 86400:
        raise ValidationFailed("expiration_duration_seconds must be a number of seconds, at least 1, or null")
    return float(seconds)


def _path(key: str) -> str | None:
    """The object path of a URL key `<expires_at>.<secret>/<name>`; None for anything else (no traversal)."""
    token, _, name = key.partition("/")
    expires_at, dot, secret = token.partition(".")
    if not (dot and SECRET.fullmatch(secret) and NAME.fullmatch(name)):
        return None
    if expires_at != NEVER and not expires_at.isdigit():
        return None
    return f"{expires_at}/{secret}/{name}"
