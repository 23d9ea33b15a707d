"""A request's LoRAs and embeddings, from its `path`s to what its run sees, and back.

`prepare` runs before the run slot, on the event loop and threads: files located (downloaded when they are
URLs) and read, embeddings checked. `apply` and `clear` run on the pipeline thread while the slot is held:
LoRAs loaded (once per replica) and switched on at the request's scales, embedding tokens added; then all of
it undone, so that the next run sees the model as it was. A refused adapter is a 422 and changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from deployments.adapter_files import EMBEDDING_DEFAULT_FILE, AdapterSources
from deployments.embeddings import EmbeddingVectors, add_tokens, embedding_vectors, remove_tokens
from deployments.loras import LoadedLoras
from serve_app.config import AdapterConfig
from serve_app.contract.adapters import LORA_DEFAULT_FILE, LoraWeight
from serve_app.contract.requests import ResolvedRequest


@dataclass
class PreparedAdapters:
    """What `apply` needs: each LoRA's file (its tensors too when it was not loaded when prepared), and the
    embeddings' vectors."""

    loras: tuple[LoraWeight, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)
    state_dicts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    embeddings: list[EmbeddingVectors] = field(default_factory=list)
    tokens_added: bool = False  # by `apply`: only then does `clear` take them out

    def __bool__(self) -> bool:
        return bool(self.loras or self.embeddings)


class RequestAdapters:
    def __init__(self, pipeline: StableDiffusionXLPipeline, config: AdapterConfig, sources: AdapterSources) -> None:
        self._pipeline = pipeline
        self._sources = sources
        self.loras = LoadedLoras(pipeline, config.cache_max_count, config.cache_max_bytes)
        self.embedding_runs = 0

    async def prepare(self, request: ResolvedRequest) -> PreparedAdapters:
        """Locate and read the request's adapter files (LoRAs already loaded here are only located)."""
        prepared = PreparedAdapters(loras=request.loras)
        for index, lora in enumerate(request.loras):
            loc = ["body", "loras", index, "path"]
            file = await self._sources.locate(lora.path, loc, LORA_DEFAULT_FILE)
            prepared.files[lora.path] = file
            if not self.loras.has(lora.path) and lora.path not in prepared.state_dicts:
                prepared.state_dicts[lora.path] = await asyncio.to_thread(self._sources.read, file, loc)
        for index, embedding in enumerate(request.embeddings):
            loc = ["body", "embeddings", index, "path"]
            file = await self._sources.locate(embedding.path, loc, EMBEDDING_DEFAULT_FILE)
            tensors = await asyncio.to_thread(self._sources.read, file, loc)
            prepared.embeddings.append(embedding_vectors(tensors, embedding.tokens, self._pipeline, loc))
        return prepared

    def apply(self, prepared: PreparedAdapters) -> None:
        """Load what is missing, switch on the request's LoRAs, add its tokens. On the pipeline thread."""
        keep = {lora.path for lora in prepared.loras}
        for index, lora in enumerate(prepared.loras):
            if not self.loras.has(lora.path):
                loc = ["body", "loras", index, "path"]
                # Evicted since it was prepared (another run's LoRAs): read it again, from this replica's disk.
                state_dict = prepared.state_dicts.pop(lora.path, None)
                if state_dict is None:
                    state_dict = self._sources.read(prepared.files[lora.path], loc)
                self.loras.load(lora.path, state_dict, loc, keep)
        prepared.state_dicts.clear()  # loaded: the CPU copy is not needed any more
        if prepared.loras:
            self.loras.activate(prepared.loras)
        try:
            add_tokens(self._pipeline, prepared.embeddings)  # all of them, or none (and a 422)
        except BaseException:
            self.loras.deactivate()
            raise
        if prepared.embeddings:
            prepared.tokens_added = True
            self.embedding_runs += 1

    def clear(self, prepared: PreparedAdapters) -> None:
        """Undo `apply`: the model as it was before the run. On the pipeline thread."""
        if prepared.tokens_added:
            remove_tokens(self._pipeline, prepared.embeddings)
            prepared.tokens_added = False
        if prepared.loras:
            self.loras.deactivate()

    def stats(self) -> dict:
        stats = self.loras.stats
        return {
            "lora_loads": stats.loads,
            "lora_evictions": stats.evictions,
            "lora_load_seconds": stats.load_seconds,
            "loras_loaded": self.loras.resident,
            "embedding_runs": self.embedding_runs,
        }
