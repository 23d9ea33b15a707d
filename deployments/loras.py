"""The LoRAs a model replica keeps loaded, and which of them a run sees.

Adapters go through diffusers' PEFT integration: each file is loaded once under its own adapter name
(`load_lora_weights`) and stays loaded, least recently used evicted first (`delete_adapters`) when the
replica holds `adapters.cache_max_count` of them or `cache_max_bytes` of their weights. A run with LoRAs
switches on exactly its own at its own scales (`set_adapters`); every other run has LoRA layers switched
off (`disable_lora`), which computes the base layers alone: the same seed gives the same image, bit for bit,
as before any LoRA was loaded. Every method runs on the pipeline thread while the run slot is held.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline

from deployments.adapter_files import Location, adapter_error
from deployments.failures import TORCH_OUT_OF_MEMORY
from serve_app.contract.adapters import LoraWeight

logger = logging.getLogger("ray.serve")

# A LoRA's file names each adapted module once in its "down" (A) matrix, whatever its key format.
_DOWN_MARKERS = ("lora_A.", "lora.down.", "lora_down.", "lora_linear_layer.down.")


@dataclass
class LoraStats:
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class LoadedLoras:
    def __init__(self, pipeline: StableDiffusionXLPipeline, max_count: int, max_bytes: int) -> None:
        self._pipeline = pipeline
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._resident: OrderedDict[str, int] = OrderedDict()  # path -> bytes, least recently used first
        self._enabled = False
        self.stats = LoraStats()

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def has(self, path: str) -> bool:
        return path in self._resident

    def load(self, path: str, state_dict: dict[str, torch.Tensor], loc: Location, keep: set[str]) -> None:
        """Load one LoRA under its own name, then evict the least recently used ones not in `keep` (the run's
        own) until the bounds hold again; loading first, a refused file (another architecture: a 422) evicts
        nothing. While it loads, the replica holds one adapter more than the bounds."""
        started = time.perf_counter()
        size = sum(tensor.numel() for tensor in state_dict.values()) * self._pipeline.unet.dtype.itemsize
        name = adapter_name(path)
        expected = sum(1 for key in state_dict if any(marker in key for marker in _DOWN_MARKERS))
        try:
            self._pipeline.load_lora_weights(dict(state_dict), adapter_name=name)
            loaded = self._modules_with(name)
        except Exception as error:  # noqa: BLE001 - diffusers and PEFT raise many types for a foreign file
            self._delete(name)
            if isinstance(error, TORCH_OUT_OF_MEMORY) or "CUDA" in str(error):
                raise  # the device's failure, not the file's: classified by the engine
            logger.info("LoRA %s did not load: %r", path, error)
            raise adapter_error(loc, "adapter_incompatible", "the LoRA does not fit this model's layers") from None
        if expected == 0 or loaded < expected:
            self._delete(name)
            message = f"the LoRA adapts {expected} layers; {loaded} of them are in this model (one for another model?)"
            raise adapter_error(loc, "adapter_incompatible", message)
        self._resident[path] = size
        self._pipeline.disable_lora()  # a newly loaded adapter is active: the run chooses what it sees
        self._enabled = False
        self._evict_over_bounds(keep | {path})
        self.stats.loads += 1
        self.stats.load_seconds += time.perf_counter() - started
        logger.info("Loaded LoRA %s (%d layers, %.1f MB)", path, loaded, size / 1e6)

    def activate(self, loras: tuple[LoraWeight, ...]) -> None:
        """The run sees these LoRAs, at their scales, and no other; all of them are loaded."""
        for lora in loras:
            self._resident.move_to_end(lora.path)
        if not self._enabled:
            self._pipeline.enable_lora()
            self._enabled = True
        # In one order whatever the request's: the layers sum their LoRAs in it, and float sums depend on it.
        ordered = sorted(loras, key=lambda lora: lora.path)
        self._pipeline.set_adapters([adapter_name(lora.path) for lora in ordered], [lora.scale for lora in ordered])

    def deactivate(self) -> None:
        """After a run with LoRAs: the base layers alone again."""
        if self._enabled:
            self._pipeline.disable_lora()
        self._enabled = False

    def _evict_over_bounds(self, keep: set[str]) -> None:
        def over() -> bool:
            return len(self._resident) > self._max_count or sum(self._resident.values()) > self._max_bytes

        for path in [path for path in self._resident if path not in keep]:
            if not over():
                return
            self._delete(adapter_name(path))
            del self._resident[path]
            self.stats.evictions += 1
            logger.info("Evicted LoRA %s (least recently used)", path)

    def _delete(self, name: str) -> None:
        if any(name in names for names in self._pipeline.get_list_adapters().values()):
            self._pipeline.delete_adapters(name)

    def _modules_with(self, name: str) -> int:
        """Layers of the UNet and both text encoders that carry adapter `name`."""
        components: list[torch.nn.Module] = [
            self._pipeline.unet,
            self._pipeline.text_encoder,
            self._pipeline.text_encoder_2,
        ]
        modules = [module for component in components for module in component.modules()]
        return sum(1 for module in modules if name in getattr(module, "lora_A", {}))


def adapter_name(path: str) -> str:
    """PEFT's name for the adapter loaded from `path` (no dots: it is a module key)."""
    return f"lora_{hashlib.sha256(path.encode()).hexdigest()[:16]}"
