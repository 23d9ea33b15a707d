"""Result images in an object store: kept as long as the client asked (within the configured bound),
unreadable once expired, deleted by the sweep; on a local directory and on a real S3 endpoint."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from serve_app.config import QueueConfig
from serve_app.contract.errors import ValidationFailed
from serve_app.queue.outputs import OutputStore, parse_lifecycle
from tests.s3_server import make_bucket, object_names, s3_endpoint, service_env  # noqa: F401 - a fixture

PNG = (b"\x89PNG fake bytes", "image/png")
JPEG = (b"\xff\xd8 fake bytes", "image/jpeg")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def key_of(url: str) -> str:
    return url.removeprefix("/files/")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "default"),
        ('{"expiration_duration_seconds": 3600}', 3600.0),
        ('{"expiration_duration_seconds": null}', None),
    ],
)
def test_the_lifecycle_header_as_fal_client_sends_it(header: str | None, expected: object) -> None:
    assert parse_lifecycle(header) == expected


@pytest.mark.parametrize(
    "header", ["3600", "{}", "not json", '{"expiration_duration_seconds": 0}', '{"expiration_duration_seconds": true}']
)
def test_a_malformed_lifecycle_header_is_a_clear_422(header: str) -> None:
    with pytest.raises(ValidationFailed, match="expiration_duration_seconds"):
        parse_lifecycle(header)


def test_what_a_job_asks_for_is_bounded_by_the_configured_maximum() -> None:
    bounded = OutputStore.in_memory(QueueConfig(outputs_default_expiration_s=600, outputs_max_expiration_s=3600))
    assert bounded.keep_for("default") == 600
    assert bounded.keep_for(60.0) == 60
    assert bounded.keep_for(10**6) == 3600
    assert bounded.keep_for(None) == 3600  # fal's null: as long as allowed
    unlimited = OutputStore.in_memory(QueueConfig(outputs_max_expiration_s=None))
    assert unlimited.keep_for(None) is None and unlimited.keep_for(10**6) == 10**6


def test_a_file_is_served_until_it_expires_then_swept() -> None:
    async def scenario() -> None:
        clock = Clock()
        outputs = OutputStore.in_memory(clock=clock)
        short = await outputs.put(1200, [PNG, JPEG])
        kept = await outputs.put(None, [PNG])
        assert [url.rsplit("/", 1)[1] for url in short] == ["0.png", "1.jpeg"]
        assert await outputs.get(key_of(short[1])) == JPEG
        clock.now += 1199  # within its time (expiry rounds up to the minute, never down)
        assert await outputs.get(key_of(short[0])) == PNG
        clock.now += 62
        assert await outputs.get(key_of(short[0])) is None  # expired: unreadable before any sweep
        assert await outputs.sweep() == 2
        clock.now += 10 * 365 * 86400
        assert await outputs.sweep() == 0
        assert await outputs.get(key_of(kept[0])) == PNG  # no expiry asked and none configured

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "key",
    ["../0.png", f"never.{'a' * 20}/../../x", "123/0.png", f"12x.{'a' * 20}/0.png", "never.short/0.png"],
)
def test_malformed_file_keys_find_nothing(key: str) -> None:
    assert asyncio.run(OutputStore.in_memory().get(key)) is None


def test_a_local_directory_keeps_files_and_the_sweep_leaves_nothing_behind(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = QueueConfig(outputs_url=str(tmp_path / "outputs"))
        outputs = OutputStore.open(config)
        clock = Clock()
        outputs._clock = clock  # the same store, on a clock the test moves
        (url,) = await outputs.put(60, [PNG])
        assert await outputs.get(key_of(url)) == PNG
        assert [p.read_bytes() for p in (tmp_path / "outputs").rglob("*.png")] == [PNG[0]]
        clock.now += 3600
        assert await outputs.sweep() == 1
        assert list((tmp_path / "outputs").iterdir()) == []  # no empty directories left either

    asyncio.run(scenario())


def test_an_s3_bucket_holds_the_images_and_the_sweep_deletes_expired_ones(
    s3_endpoint: str,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over the S3 protocol (moto's server): the objects are in the bucket under the configured prefix;
    presigned URLs fetch them with their content type; expired ones are deleted."""
    for name, value in service_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    bucket = make_bucket(s3_endpoint)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        outputs = OutputStore.open(QueueConfig(outputs_url=f"s3://{bucket}/sdxl", outputs_presigned_urls=True))
        clock = Clock()
        clock.now = time.time()  # presigned URLs are checked against the server's clock
        outputs._clock = clock
        presigned = await outputs.put(3600, [JPEG])
        (served,) = await outputs.put(60, [PNG], presign=False)  # a `sync_mode` job's: read back by the app
        assert await outputs.get(key_of(served)) == PNG
        before = object_names(s3_endpoint, bucket)
        clock.now += 600
        assert await outputs.sweep() == 1
        return presigned, before, object_names(s3_endpoint, bucket)

    presigned, before, after = asyncio.run(scenario())
    assert len(before) == 2 and all(name.startswith("sdxl/") for name in before)
    (url,) = presigned
    assert url.startswith(f"{s3_endpoint}/{bucket}/sdxl/") and "X-Amz-Signature=" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.content == JPEG[0]
    assert fetched.headers["content-type"] == "image/jpeg"
    assert after == [name for name in before if name.endswith(".jpeg")]
