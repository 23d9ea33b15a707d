"""`fetch_url`: image inputs by URL against a real HTTP server on 127.0.0.1, with the SSRF checks on (the
address check at connect time refuses loopback) and off (`allow_private_networks`, to reach the test server)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpcore
import pytest

from sdxl_client.dev_cert import write_self_signed_certificate
from serve_app.inputs.fetch import FetchPolicy, FetchRefused, fetch_url, is_public_address

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
LIMIT = 4096


class Handler(BaseHTTPRequestHandler):
    """The test content: an image, bodies over `LIMIT` (with and without a length), a slow answer, redirects."""

    def do_GET(self) -> None:
        redirects = {
            "/redirect-ok": "/image.png",
            "/redirect-off-list": "http://not-allowed.example/x",
            "/loop": "/loop",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/image.png":
            self._answer(IMAGE)
        elif self.path == "/big":
            self._answer(b"x" * (LIMIT + 1))
        elif self.path == "/big-unsized":
            self.send_response(200)  # HTTP/1.0 without a length: the body ends when the connection closes
            self.end_headers()
            for _ in range(8):
                self.wfile.write(b"x" * 1024)
        elif self.path == "/slow":
            time.sleep(3)
            self._answer(IMAGE)
        else:
            self._answer(b"not here", status=404)

    def _answer(self, body: bytes, status: int = 200) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (a timeout test)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serving(context: ssl.SSLContext | None = None, handler: type[BaseHTTPRequestHandler] = Handler) -> Iterator[int]:
    """The port of a test server on 127.0.0.1 answering with `handler`, over TLS when given a context."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The base URL of the test server."""
    for port in serving():
        yield f"http://127.0.0.1:{port}"


def local(**overrides: object) -> FetchPolicy:
    """A policy that may fetch from the test server."""
    settings: dict = {"allowed_hosts": ["127.0.0.1"], "allow_private_networks": True, "max_bytes": LIMIT}
    return FetchPolicy(**{**settings, **overrides})


def fetch(url: str, policy: FetchPolicy) -> bytes:
    return asyncio.run(fetch_url(url, policy))


def refusal(url: str, policy: FetchPolicy) -> FetchRefused:
    with pytest.raises(FetchRefused) as caught:
        fetch(url, policy)
    return caught.value


def test_fetches_from_an_allowed_host(server: str) -> None:
    assert fetch(f"{server}/image.png", local()) == IMAGE


def test_refuses_loopback_at_connect_time(server: str) -> None:
    refused = refusal(f"{server}/image.png", local(allow_private_networks=False))
    assert refused.kind == "file_download_error"
    assert "private or reserved address" in refused.message


def test_refuses_cloud_metadata_without_a_network_wait() -> None:
    started = time.monotonic()
    refused = refusal("http://169.254.169.254/latest/meta-data", FetchPolicy(allowed_hosts=["*"]))
    assert time.monotonic() - started < 1
    assert refused.kind == "file_download_error"
    assert "169.254.169.254" in refused.message


def test_refuses_a_name_that_resolves_to_a_private_address(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    refused = refusal(
        f"http://localhost:{port}/image.png", local(allowed_hosts=["localhost"], allow_private_networks=False)
    )
    assert "'localhost' resolves to a private or reserved address" in refused.message


@pytest.mark.parametrize(("certified", "fetched"), [("localhost", True), ("other.example", False)])
def test_tls_verifies_the_host_name_not_the_address_connected_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, certified: str, fetched: bool
) -> None:
    """The connection goes to the checked IP literal, yet the certificate must still name the URL's host."""
    cert_path, key_path = write_self_signed_certificate(tmp_path, certified)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    trusting = ssl.create_default_context(cafile=str(cert_path))
    pool = functools.partial(httpcore.AsyncConnectionPool, ssl_context=trusting)
    monkeypatch.setattr(httpcore, "AsyncConnectionPool", pool)  # trust the test CA instead of certifi's
    for port in serving(server_context):
        url = f"https://localhost:{port}/image.png"
        policy = local(allowed_hosts=["localhost"])
        if fetched:
            assert fetch(url, policy) == IMAGE
        else:
            assert refusal(url, policy).message == "could not connect to the image URL host 'localhost'"


@pytest.mark.parametrize(
    ("url", "allowed_hosts", "says"),
    [
        ("http://127.0.0.1/image.png", ["example.com", ".example.org"], "not in this service's"),
        ("http://evil-example.com/image.png", [".example.com"], "not in this service's"),
        ("http://127.0.0.1/image.png", [], "`inputs.url_allowed_hosts` is empty"),
        ("file:///etc/passwd", ["*"], "http(s) URL"),
        ("ftp://127.0.0.1/image.png", ["*"], "http(s) URL"),
        ("http://user:secret@127.0.0.1/image.png", ["*"], "no credentials"),
        ("http://:secret@127.0.0.1/image.png", ["*"], "no credentials"),
        ("http://127.0.0.1:99999/image.png", ["*"], "http(s) URL"),
    ],
)
def test_refuses_urls_off_the_policy(url: str, allowed_hosts: list[str], says: str) -> None:
    refused = refusal(url, local(allowed_hosts=allowed_hosts))
    assert refused.kind == "file_download_error"
    assert says in refused.message


def test_follows_a_redirect_within_the_list(server: str) -> None:
    assert fetch(f"{server}/redirect-ok", local()) == IMAGE


def test_refuses_a_redirect_off_the_list(server: str) -> None:
    refused = refusal(f"{server}/redirect-off-list", local())
    assert "redirect host 'not-allowed.example' is not in" in refused.message


def test_refuses_too_many_redirects(server: str) -> None:
    refused = refusal(f"{server}/loop", local(max_redirects=2))
    assert refused.kind == "file_download_error"
    assert "redirected more than 2 times" in refused.message


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_refuses_a_body_over_the_limit(server: str, path: str) -> None:
    assert refusal(f"{server}{path}", local()).kind == "file_too_large"


def test_refuses_a_slow_answer_after_the_timeout(server: str) -> None:
    started = time.monotonic()
    refused = refusal(f"{server}/slow", local(timeout_s=1))
    assert time.monotonic() - started < 5  # a hang guard, not a timing assertion
    assert refused.message == "image URL host '127.0.0.1' did not answer within 1 s"


def test_refuses_an_error_status(server: str) -> None:
    refused = refusal(f"{server}/404", local())
    assert refused.kind == "file_download_error"
    assert refused.message.endswith("answered HTTP 404")


def test_refuses_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = refusal(f"http://127.0.0.1:{port}/image.png", local())
    assert refused.kind == "file_download_error"
    assert refused.message == "could not connect to the image URL host '127.0.0.1'"


def test_refuses_a_name_that_does_not_resolve() -> None:
    refused = refusal("http://no-such-host.invalid/image.png", local(allowed_hosts=[".invalid"]))
    assert refused.message == "could not resolve the image URL host 'no-such-host.invalid'"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public
