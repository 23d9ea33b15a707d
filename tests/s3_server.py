"""A throwaway S3 endpoint for tests: moto's standalone server (`moto[server]`, from PyPI) on a free
port, speaking the S3 protocol over real HTTP, as MinIO or AWS would.

Use the session fixture with `from tests.s3_server import s3_endpoint`; `make_bucket` gives each test a
bucket of its own, `object_names` lists what a bucket holds (moto checks no signatures, so plain
requests do both, without a second S3 client in the test process).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.redis_server import _free_port

STARTUP_TIMEOUT_S = 30.0
# What the service reads (obstore takes the standard AWS variables) to reach the test endpoint.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def run_s3_server() -> Iterator[str]:
    """Start `moto_server`, wait until it answers, yield its endpoint URL, stop it."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not os.path.exists(binary):
        pytest.fail("moto_server is not installed; `pip install -e '.[test]'` installs moto[server]", pytrace=False)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="s3-test-") as workdir:
        log = open(Path(workdir) / "moto.log", "w")  # noqa: SIM115 - a file, not a pipe nobody drains
        process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(endpoint, timeout=1).status_code < 500:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer within {STARTUP_TIMEOUT_S} s")
                time.sleep(0.1)
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with run_s3_server() as endpoint:
        yield endpoint


def make_bucket(endpoint: str) -> str:
    bucket = f"outputs-{uuid.uuid4().hex[:12]}"
    httpx.put(f"{endpoint}/{bucket}").raise_for_status()
    return bucket


def object_names(endpoint: str, bucket: str) -> list[str]:
    listing = httpx.get(f"{endpoint}/{bucket}", params={"list-type": "2"})
    listing.raise_for_status()
    return re.findall(r"<Key>([^<]+)</Key>", listing.text)


def service_env(endpoint: str) -> dict[str, str]:
    """The environment a service (a Ray cluster) needs for `queue.outputs_url: s3://...` at `endpoint`."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}
