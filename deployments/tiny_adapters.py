"""A LoRA and an embedding for the built-in tiny model, written offline: the README's example and the tests
use them with no download.

    python -m deployments.tiny_adapters          # tiny-style.safetensors, tiny-embedding.safetensors
    python -m deployments.tiny_adapters --hub local/tiny-style   # and the LoRA as a Hugging Face repo, cached

They go to the default adapter directory (`adapters.local_dir` unset: `~/.cache/sdxl-serve/adapters`, or
`$SDXL_SERVE_CACHE/adapters`), where a request names them by file name.

The LoRA has the layout diffusers' `save_lora_weights` writes: PEFT's `lora_A`/`lora_B` on the UNet's
attention projections. Its weights are random (fixed seeds), large enough to change the image.
The embedding has SDXL's layout: `clip_l` and `clip_g`, one row per token (two, fal's `<s0>`, `<s1>`).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig

from deployments.adapter_files import default_adapter_dir
from deployments.tiny import ensure_tiny_model
from serve_app.contract.adapters import LORA_DEFAULT_FILE

LORA_FILE = "tiny-style.safetensors"
EMBEDDING_FILE = "tiny-embedding.safetensors"
_SEED = 20261204
_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")  # the attention projections, as SDXL LoRAs adapt


def write_tiny_lora(target: Path, rank: int = 4, seed: int = _SEED) -> Path:
    """A LoRA on the tiny UNet's attention projections, as diffusers saves one."""
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model() / "unet")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_lora(unet, rank, seed), target)
    return target


def random_lora(unet: torch.nn.Module, rank: int = 4, seed: int = _SEED, std: float = 0.2) -> dict[str, torch.Tensor]:
    """A LoRA for any SDXL-shaped UNet (the tiny one, or a full-size one for the benchmark), in the layout
    diffusers' `save_lora_weights` writes (PEFT's `lora_A`/`lora_B` per attention projection under
    `unet.`). Random, with B not zero as a trained LoRA's is not: it changes the image."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(_TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) * std
            up = torch.randn(module.out_features, rank, generator=generator) * std
            tensors[f"unet.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = up.contiguous()
    return tensors


def write_tiny_embedding(target: Path, vectors: int = 2, seed: int = _SEED + 1) -> Path:
    """An SDXL textual inversion for the tiny model: `vectors` rows for each text encoder."""
    model_dir = ensure_tiny_model()
    encoders = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        key: torch.randn(vectors, CLIPTextConfig.from_pretrained(model_dir / encoder).hidden_size, generator=generator)
        for key, encoder in encoders.items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target)
    return target


def write_hub_repo(repo_id: str, files: dict[str, bytes], cache_dir: Path | None = None) -> Path:
    """`files` as a Hugging Face repo in the hub cache (`HF_HUB_CACHE`), as `hf_hub_download` leaves them: a
    snapshot under a commit id that `refs/main` names. Offline (`HF_HUB_OFFLINE=1`) the repo id then resolves."""
    from huggingface_hub import constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted((name, hashlib.sha1(data).hexdigest()) for name, data in files.items())).encode())
    snapshot = repo / "snapshots" / commit.hexdigest()
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit.hexdigest())
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=None, help="where to write both files")
    parser.add_argument("--hub", metavar="OWNER/NAME", help="also put the LoRA in the Hugging Face cache as this repo")
    args = parser.parse_args()
    directory = args.directory or default_adapter_dir()
    lora = write_tiny_lora(directory / LORA_FILE)
    embedding = write_tiny_embedding(directory / EMBEDDING_FILE)
    print(f"wrote {lora} and {embedding}")
    if args.hub:
        snapshot = write_hub_repo(args.hub, {LORA_DEFAULT_FILE: lora.read_bytes()})
        print(f"wrote {args.hub} into the Hugging Face cache: {snapshot}")


if __name__ == "__main__":
    main()
