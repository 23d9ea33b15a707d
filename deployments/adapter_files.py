"""An adapter's `path` to a safetensors file on this replica's disk, and its tensors.

URLs are fetched with the image inputs' care (`serve_app.inputs.fetch`: the allow-list, addresses checked at
connect time, a size and time limit) into `adapters.download_dir`, once per URL. Names are a file under
`adapters.local_dir` if there is one, else a Hugging Face id, through `huggingface_hub`'s cache (so
`HF_HUB_OFFLINE=1` with a filled cache works, as for the model). Files are parsed as safetensors and
nothing else: a pickle is refused, never unpickled. Every failure is a 422 naming the entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file

from serve_app.config import AdapterConfig, InputConfig, cache_root
from serve_app.contract.errors import ValidationFailed
from serve_app.inputs.fetch import FetchPolicy, FetchRefused, fetch_url

logger = logging.getLogger("ray.serve")

EMBEDDING_DEFAULT_FILE = "learned_embeds.safetensors"  # diffusers' name for a textual inversion
_HUB_MISSING = (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

Location = list  # ["body", "loras", 0, "path"]: where the entry is in the request


def default_adapter_dir() -> Path:
    """`adapters.local_dir` when unset: `$SDXL_SERVE_CACHE/adapters` or `~/.cache/sdxl-serve/adapters`, where
    `python -m deployments.tiny_adapters` writes."""
    return cache_root() / "adapters"


def adapter_error(loc: Location, kind: str, message: str) -> ValidationFailed:
    return ValidationFailed([{"type": kind, "loc": loc, "msg": message}])


@dataclass(frozen=True)
class AdapterSources:
    local_dir: Path
    hub_cache_dir: str | None
    download_dir: Path
    fetch: FetchPolicy
    max_file_bytes: int

    @classmethod
    def of(cls, adapters: AdapterConfig, inputs: InputConfig, hub_cache_dir: str | None) -> AdapterSources:
        download_dir = Path(adapters.download_dir or Path(tempfile.gettempdir()) / "sdxl-serve-adapters")
        fetch = FetchPolicy(
            allowed_hosts=inputs.url_allowed_hosts,
            allow_private_networks=inputs.url_allow_private_networks,
            timeout_s=adapters.url_timeout_s,
            max_bytes=adapters.max_file_bytes,
            label="adapter URL",
        )
        local_dir = Path(adapters.local_dir).expanduser() if adapters.local_dir else default_adapter_dir()
        return cls(local_dir.resolve(), hub_cache_dir, download_dir, fetch, adapters.max_file_bytes)

    async def locate(self, path: str, loc: Location, default_file: str) -> Path:
        """The file `path` names, on this replica's disk (downloaded first when it is a URL)."""
        if path.lower().startswith(("http://", "https://")):
            return await self._downloaded(path, loc)
        return await asyncio.to_thread(self._named, path, loc, default_file)

    def read(self, file: Path, loc: Location) -> dict[str, torch.Tensor]:
        """The file's tensors, on the CPU; a 422 when it is too large or not safetensors. Blocking."""
        size = file.stat().st_size
        if size > self.max_file_bytes:
            raise adapter_error(loc, "file_too_large", f"the adapter is {size} bytes, over {self.max_file_bytes}")
        try:
            return load_file(file, device="cpu")
        except Exception as error:  # noqa: BLE001 - safetensors' own errors, and OSError for a truncated file
            logger.info("Adapter %s is not safetensors: %r", file.name, error)
            raise adapter_error(loc, "adapter_not_safetensors", "the file is not a safetensors file") from None

    async def _downloaded(self, url: str, loc: Location) -> Path:
        target = self.download_dir / f"{hashlib.sha256(url.encode()).hexdigest()}.safetensors"
        if target.is_file():
            return target
        try:
            data = await fetch_url(url, self.fetch)
        except FetchRefused as refused:
            raise adapter_error(loc, refused.kind, refused.message) from refused
        await asyncio.to_thread(_write_atomically, target, data)
        return target

    def _named(self, path: str, loc: Location, default_file: str) -> Path:
        """A file under the local directory, else a Hugging Face id (`owner/name[/file]`)."""
        candidate = (self.local_dir / path).resolve()
        if candidate.is_relative_to(self.local_dir) and candidate.is_file():
            return candidate
        parts = path.split("/")
        if len(parts) < 2 or (len(parts) == 2 and path.lower().endswith(".safetensors")):
            raise adapter_error(loc, "adapter_not_found", f"no adapter {path!r} in the adapter directory")
        return self._from_hub("/".join(parts[:2]), "/".join(parts[2:]), loc, default_file)

    def _from_hub(self, repo_id: str, filename: str, loc: Location, default_file: str) -> Path:
        try:
            if filename:
                return Path(hf_hub_download(repo_id, filename, cache_dir=self.hub_cache_dir))
            try:
                return Path(hf_hub_download(repo_id, default_file, cache_dir=self.hub_cache_dir))
            except _HUB_MISSING:
                candidates = self._hub_safetensors(repo_id)
            if len(candidates) != 1:
                found = f"{len(candidates)} other safetensors files" if candidates else "no safetensors file"
                message = f"{repo_id!r} has no {default_file} and {found}: name the file (owner/name/file.safetensors)"
                raise adapter_error(loc, "adapter_not_found", message)
            return Path(hf_hub_download(repo_id, candidates[0], cache_dir=self.hub_cache_dir))
        except GatedRepoError:
            raise adapter_error(loc, "adapter_not_allowed", f"{repo_id!r} is gated on the Hugging Face hub") from None
        except (*_HUB_MISSING, HFValidationError):
            where = f"{repo_id}/{filename}" if filename else repo_id
            message = f"no adapter {where!r} on the Hugging Face hub or in this replica's cache"
            raise adapter_error(loc, "adapter_not_found", message) from None
        except OSError as error:  # the hub unreachable, with nothing cached
            logger.info("Hugging Face adapter %s: %r", repo_id, error)
            message = f"{repo_id!r} is not in this replica's Hugging Face cache and the hub could not be reached"
            raise adapter_error(loc, "adapter_not_found", message) from None

    def _hub_safetensors(self, repo_id: str) -> list[str]:
        """The repo's safetensors files: from the cached snapshot, else from the hub's listing."""
        try:
            snapshot = Path(snapshot_download(repo_id, cache_dir=self.hub_cache_dir, local_files_only=True))
            return sorted(str(file.relative_to(snapshot)) for file in snapshot.rglob("*.safetensors"))
        except _HUB_MISSING:
            pass
        return sorted(name for name in list_repo_files(repo_id) if name.endswith(".safetensors"))


def _write_atomically(target: Path, data: bytes) -> None:
    """Another request for the same URL finds the whole file or none of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".part")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.replace(temporary, target)
