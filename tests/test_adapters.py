"""LoRAs and embeddings on the engine (the tiny model, in-process): each run sees exactly its own adapters,
the model is as before after it (bit for bit), a LoRA is loaded once per replica and evicted least recently
used first, and every bad adapter is a 422 that leaves the replica clean."""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from deployments.engine import SDXLEngine
from deployments.tiny_adapters import EMBEDDING_FILE, LORA_FILE, write_hub_repo, write_tiny_embedding, write_tiny_lora
from serve_app.config import AppConfig
from serve_app.contract.adapters import LORA_DEFAULT_FILE
from serve_app.contract.requests import GenerationRequest
from tests.test_input_fetch import serving
from tests.tiny_engine import collect, tiny_config, tiny_engine

PROMPT = "a <s0><s1> fox"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapters")
    write_tiny_lora(directory / LORA_FILE)
    for seed in (1, 2):
        write_tiny_lora(directory / f"other-{seed}.safetensors", seed=seed)
    write_tiny_embedding(directory / EMBEDDING_FILE)
    write_tiny_embedding(directory / "one-vector.safetensors", vectors=1)
    # An SD 1.5 style LoRA: half of its layers are not in this UNet (down_blocks.0 has no attention in SDXL).
    lora = load_file(directory / LORA_FILE)
    save_file(
        {key.replace("down_blocks.1.", "down_blocks.0."): value for key, value in lora.items()},
        directory / "sd15.safetensors",
    )
    (directory / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    save_file({"vectors": torch.zeros(2, 32)}, directory / "not-sdxl-embedding.safetensors")
    return directory


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, adapter_dir: Path) -> AppConfig:
    return tiny_config(
        tmp_path_factory.mktemp("cache"),
        adapters={"local_dir": str(adapter_dir), "cache_max_count": 2, "max_loras": 2},
    )


@pytest.fixture(scope="module")
def engine(config: AppConfig) -> SDXLEngine:
    return tiny_engine(config.model.cache_dir, adapters=config.adapters.model_dump())


def generate(engine: SDXLEngine, config: AppConfig, **fields: object) -> dict:
    body = GenerationRequest(
        **{"prompt": PROMPT, "num_inference_steps": 3, "width": 128, "height": 128, "seed": 7, **fields}
    )
    return collect(engine, config.request_policy().resolve(body), previews=False)[-1]


def pixels(final: dict) -> np.ndarray:
    assert final["type"] == "final", final
    data = base64.b64decode(final["image"]["url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)), np.int16)


def test_a_lora_applies_to_its_own_run_only(engine: SDXLEngine, config: AppConfig) -> None:
    base = pixels(generate(engine, config, output_format="png"))
    styled = pixels(generate(engine, config, output_format="png", loras=[{"path": LORA_FILE}]))
    half = pixels(generate(engine, config, output_format="png", loras=[{"path": LORA_FILE, "scale": 0.5}]))
    after = pixels(generate(engine, config, output_format="png"))
    again = pixels(generate(engine, config, output_format="png", loras=[{"path": LORA_FILE}]))
    assert np.abs(styled - base).mean() > 2 and np.abs(half - base).mean() > 1 and np.abs(half - styled).mean() > 1
    assert np.array_equal(after, base)  # bit for bit: no trace of the LoRA
    assert np.array_equal(again, styled)
    assert engine.adapters.stats()["lora_loads"] == 1  # loaded once, then switched on and off


def test_two_loras_mix_at_their_scales(engine: SDXLEngine, config: AppConfig) -> None:
    one = pixels(generate(engine, config, output_format="png", loras=[{"path": LORA_FILE}]))
    both = [{"path": LORA_FILE}, {"path": "other-1.safetensors", "scale": 0.7}]
    mixed = pixels(generate(engine, config, output_format="png", loras=both))
    assert np.abs(mixed - one).mean() > 1
    assert np.array_equal(pixels(generate(engine, config, output_format="png", loras=both[::-1])), mixed)


def test_the_least_recently_used_lora_is_evicted(engine: SDXLEngine, config: AppConfig) -> None:
    for path in (LORA_FILE, "other-1.safetensors", "other-2.safetensors"):  # two fit (cache_max_count)
        assert generate(engine, config, loras=[{"path": path}])["type"] == "final"
    stats = engine.adapters.stats()
    assert stats["loras_loaded"] == ["other-1.safetensors", "other-2.safetensors"] and stats["lora_evictions"] >= 1
    loads = stats["lora_loads"]
    generate(engine, config, loras=[{"path": "other-2.safetensors"}])
    assert engine.adapters.stats()["lora_loads"] == loads  # still loaded
    generate(engine, config, loras=[{"path": LORA_FILE}])
    assert engine.adapters.stats()["lora_loads"] == loads + 1  # evicted before: loaded again
    assert engine.adapters.stats()["loras_loaded"] == ["other-2.safetensors", LORA_FILE]


def test_an_embedding_gives_its_tokens_meaning_for_its_run_only(engine: SDXLEngine, config: AppConfig) -> None:
    vocabulary = len(engine.models.pipeline.tokenizer), len(engine.models.pipeline.tokenizer_2)
    base = pixels(generate(engine, config, output_format="png"))
    embedded = pixels(generate(engine, config, output_format="png", embeddings=[{"path": EMBEDDING_FILE}]))
    assert np.abs(embedded - base).mean() > 1
    assert np.array_equal(pixels(generate(engine, config, output_format="png")), base)
    pipeline = engine.models.pipeline
    assert (len(pipeline.tokenizer), len(pipeline.tokenizer_2)) == vocabulary  # the tokens were taken out
    one = generate(engine, config, embeddings=[{"path": "one-vector.safetensors", "tokens": ["<s0>", "<s1>"]}])
    assert one["type"] == "final"  # more tokens than vectors: the first ones


@pytest.mark.parametrize(
    ("field", "entry", "error"),
    [
        ("loras", {"path": "missing.safetensors"}, "adapter_not_found"),
        ("loras", {"path": "pickled.safetensors"}, "adapter_not_safetensors"),
        ("loras", {"path": "sd15.safetensors"}, "adapter_incompatible"),
        ("loras", {"path": "nobody/no-such-repo"}, "adapter_not_found"),
        ("embeddings", {"path": "not-sdxl-embedding.safetensors"}, "adapter_incompatible"),
        ("embeddings", {"path": EMBEDDING_FILE, "tokens": ["a</w>", "<s1>"]}, "token_in_vocabulary"),
        ("embeddings", {"path": EMBEDDING_FILE, "tokens": ["<s0>"]}, "value_error"),
    ],
)
def test_a_bad_adapter_is_a_422_and_leaves_the_replica_clean(
    engine: SDXLEngine, config: AppConfig, field: str, entry: dict, error: str
) -> None:
    base = pixels(generate(engine, config, output_format="png"))
    loaded = engine.adapters.stats()["loras_loaded"]
    failed = generate(engine, config, **{field: [entry]})
    assert failed["type"] == "error" and failed["error_type"] == "validation_error"
    assert failed["detail"][0]["type"] == error and failed["detail"][0]["loc"][:3] == ["body", field, 0]
    assert engine.adapters.stats()["loras_loaded"] == loaded
    assert all(not names for names in engine.models.pipeline.get_list_adapters().values()) or loaded
    assert np.array_equal(pixels(generate(engine, config, output_format="png")), base)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(adapter_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, adapters={"local_dir": str(adapter_dir), "max_file_bytes": 4096})
    small = tiny_engine(tmp_path, adapters=config.adapters.model_dump())
    failed = generate(small, config, loras=[{"path": LORA_FILE}])
    assert failed["error_type"] == "validation_error" and failed["detail"][0]["type"] == "file_too_large"


def test_a_hugging_face_id_resolves_from_the_cache_offline(adapter_dir: Path, tmp_path: Path) -> None:
    """A bare repo id means its pytorch_lora_weights.safetensors, or its one other safetensors file; a file in a
    repo is named after the id. HF_HUB_OFFLINE=1 (tests/conftest.py): the cache only."""
    lora = (adapter_dir / LORA_FILE).read_bytes()
    write_hub_repo("someone/style", {LORA_DEFAULT_FILE: lora}, tmp_path / "hub")
    write_hub_repo("someone/named", {"styles/fox.safetensors": lora}, tmp_path / "hub")
    write_hub_repo("someone/two", {"a.safetensors": lora, "b.safetensors": lora}, tmp_path / "hub")
    config = tiny_config(tmp_path / "hub", adapters={"local_dir": str(tmp_path / "empty")})
    hub = tiny_engine(tmp_path / "hub", adapters=config.adapters.model_dump())
    reference = pixels(generate(hub, config, output_format="png", loras=[{"path": "someone/style"}]))
    for path in ("someone/named", "someone/named/styles/fox.safetensors", "someone/two/b.safetensors"):
        assert np.array_equal(pixels(generate(hub, config, output_format="png", loras=[{"path": path}])), reference)
    ambiguous = generate(hub, config, loras=[{"path": "someone/two"}])
    assert (
        ambiguous["detail"][0]["type"] == "adapter_not_found" and "2 other safetensors" in ambiguous["detail"][0]["msg"]
    )


class _FileServer(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("content-length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def file_server(adapter_dir: Path) -> Iterator[str]:
    _FileServer.files = {"/style.safetensors": (adapter_dir / LORA_FILE).read_bytes()}
    _FileServer.hits = []
    for port in serving(handler=_FileServer):
        yield f"http://127.0.0.1:{port}"


def test_a_url_is_fetched_once_with_the_image_inputs_allow_list(file_server: str, tmp_path: Path) -> None:
    inputs = {"url_allowed_hosts": ["127.0.0.1"], "url_allow_private_networks": True}
    adapters = {"download_dir": str(tmp_path / "downloads"), "local_dir": str(tmp_path)}
    config = tiny_config(tmp_path, inputs=inputs, adapters=adapters)
    fetching = tiny_engine(tmp_path, inputs=inputs, adapters=adapters)
    url = f"{file_server}/style.safetensors"
    first = pixels(generate(fetching, config, output_format="png", loras=[{"path": url}]))
    assert np.array_equal(pixels(generate(fetching, config, output_format="png", loras=[{"path": url}])), first)
    assert _FileServer.hits == ["/style.safetensors"]  # downloaded once, then from the replica's disk
    missing = generate(fetching, config, loras=[{"path": f"{file_server}/gone.safetensors"}])
    assert missing["detail"][0]["type"] == "file_download_error" and "adapter URL" in missing["detail"][0]["msg"]


def test_running_out_of_memory_while_loading_a_lora_is_a_503_not_the_files_fault(
    adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tmp_path, adapters={"local_dir": str(adapter_dir)})
    engine = tiny_engine(tmp_path, adapters=config.adapters.model_dump())
    base = pixels(generate(engine, config, output_format="png"))

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.models.pipeline, "load_lora_weights", out_of_memory)
    failed = generate(engine, config, loras=[{"path": LORA_FILE}])
    assert failed["error_type"] == "out_of_memory"
    assert engine.usable and engine.adapters.stats()["loras_loaded"] == []
    assert np.array_equal(pixels(generate(engine, config, output_format="png")), base)
