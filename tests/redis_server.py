"""A throwaway `redis-server` for tests: 127.0.0.1, a free port, no persistence; and `RedisProcess`, one
the fault tests kill, pause and restart, with its append-only file.

Use the session fixture from any test module with `from tests.redis_server import redis_url`.
A missing `redis-server` fails the tests that need it (CI installs it), rather than skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

STARTUP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def run_redis_server() -> Iterator[str]:
    """Start `redis-server`, wait until it answers PING, yield its URL, stop it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; install it (Debian: apt-get install redis-server)", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="redis-test-") as workdir:
        port = _free_port()
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log = Path(workdir) / "redis.log"  # a file, not a pipe nobody drains
        process = subprocess.Popen([*args, "--dir", workdir, "--logfile", str(log)])
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_for_ping(url, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        while True:
            if process.poll() is not None:
                output = log.read_text() if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {process.returncode}:\n{output}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis shared by the whole session; give each test its own key prefix."""
    with run_redis_server() as url:
        yield url


class RedisProcess:
    """A `redis-server` on a given port that keeps every write in its append-only file before it answers
    (`appendfsync always`): killed (SIGKILL) and started again it comes back with everything it acked."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._workdir = workdir
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; install it (Debian: apt-get install redis-server)", pytrace=False)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--dir", str(self._workdir)]  # fmt: skip
        log = self._workdir / "redis.log"
        self._process = subprocess.Popen([*args, "--logfile", str(log)])
        _wait_for_ping(self.url, self._process, log)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save; what the append-only file holds is what comes back."""
        self._process.kill()
        self._process.wait()

    def pause(self) -> None:
        os.kill(self._process.pid, signal.SIGSTOP)  # connections stay open, nothing answers

    def resume(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.resume()
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
