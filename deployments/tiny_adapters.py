"""A LoRA and an embedding for the built-in tiny model, written offline: the README's example and the tests
use them with no download.

    python -m deployments.tiny_adapters          # tiny-style.safetensors, tiny-embedding.safetensors
    python -m deployments.tiny_adapters --hub local/tiny-style   # and the LoRA as a Hugging Face repo, cached

They go to the default adapter directory (`adapters.local_dir` unset: `~/.cache/sdxl-serve/adapters`, or
`$SDXL_SERVE_CACHE/adapters`), where a request names them by file name.

The LoRA is made as a trained one is saved: PEFT layers on the UNet's attention projections, written by
diffusers' `save_lora_weights`. Its weights are random (fixed seeds), large enough to change the image.
The embedding has SDXL's layout: `clip_l` and `clip_g`, one row per token (two, fal's `<s0>`, `<s1>`).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig

from deployments.tiny import cache_root, ensure_tiny_model
from serve_app.contract.adapters import LORA_DEFAULT_FILE

LORA_FILE = "tiny-style.safetensors"
EMBEDDING_FILE = "tiny-embedding.safetensors"
_SEED = 20261204


def write_tiny_lora(target: Path, rank: int = 4, seed: int = _SEED) -> Path:
    """A LoRA on the tiny UNet's attention projections, as diffusers saves one."""
    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model() / "unet")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    for name, parameter in unet.named_parameters():
        if "lora_" in name:  # PEFT starts B at zero (no effect); a trained LoRA's is not
            torch.nn.init.normal_(parameter, std=0.2)
    with tempfile.TemporaryDirectory() as scratch:
        StableDiffusionXLPipeline.save_lora_weights(scratch, unet_lora_layers=get_peft_model_state_dict(unet))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((Path(scratch) / LORA_DEFAULT_FILE).read_bytes())
    return target


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
    directory = args.directory or cache_root() / "adapters"
    lora = write_tiny_lora(directory / LORA_FILE)
    embedding = write_tiny_embedding(directory / EMBEDDING_FILE)
    print(f"wrote {lora} and {embedding}")
    if args.hub:
        snapshot = write_hub_repo(args.hub, {LORA_DEFAULT_FILE: lora.read_bytes()})
        print(f"wrote {args.hub} into the Hugging Face cache: {snapshot}")


if __name__ == "__main__":
    main()
