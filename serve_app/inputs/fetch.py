"""Image inputs by URL: fetch what a client names, without letting it reach into our own network.

A server that fetches any URL a client names is an SSRF hole (cloud metadata at 169.254.169.254, internal admin
ports), so hosts must match `inputs.url_allowed_hosts`, and the address a connection is about to use is checked at
connect time, after our own DNS lookup: no window for a name to resolve to a public address when checked and to a
private one when connected (DNS rebinding). Redirects are followed by hand, each hop checked again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import anyio
import httpcore

from serve_app.host_patterns import host_matches

logger = logging.getLogger("ray.serve")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_TARGET_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))  # quote only spaces, controls and non-ASCII


@dataclass(frozen=True)
class FetchPolicy:
    """What `fetch_url` may fetch and how long it may take; built from the `inputs` config section."""

    allowed_hosts: list[str]  # exact host names, ".example.com" for its subdomains, "*" for any; empty: fetching off
    allow_private_networks: bool = False  # tests set True to fetch from 127.0.0.1
    timeout_s: float = 10.0  # whole fetch (connect, redirects, body)
    max_bytes: int = 32 * 1024 * 1024  # body size limit
    max_redirects: int = 3
    label: str = "image URL"  # what the fetched thing is, in messages: "image URL", "adapter URL"


class FetchRefused(Exception):
    """Why a URL was not fetched; `kind` is fal's error type and `message` is safe to show the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def is_public_address(address: IPAddress) -> bool:
    """Whether an address is globally routable: not private, loopback, link-local (cloud metadata), multicast,
    reserved, unspecified or carrier-grade NAT, nor an IPv6 address that carries one of those."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(address.ipv4_mapped)
        embedded = address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None
        )
        if address.is_site_local or (embedded is not None and not is_public_address(embedded)):
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address in _CARRIER_GRADE_NAT
    )


@dataclass(frozen=True)
class _Target:
    """One URL to GET, checked against the policy: as given (to resolve a redirect's `Location` against), as
    httpcore's URL, the host to name in messages, and the Host header."""

    given: str
    url: httpcore.URL
    host: str
    host_header: str


def _target(url: str, allowed_hosts: list[str], label: str) -> _Target:
    if not allowed_hosts:
        raise FetchRefused(
            "file_download_error", "URL inputs are off on this service (`inputs.url_allowed_hosts` is empty)"
        )
    refused = FetchRefused("file_download_error", f"{label} must be an http(s) URL with a host name and no credentials")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise refused from None
    credentials = parts.username is not None or parts.password is not None
    if parts.scheme not in ("http", "https") or not host or port == 0 or credentials:
        raise refused
    if not host_matches(host, allowed_hosts):
        raise FetchRefused(
            "file_download_error", f"{label} host {host!r} is not in this service's `inputs.url_allowed_hosts`"
        )
    path = quote(parts.path or "/", safe=_TARGET_SAFE) + (
        f"?{quote(parts.query, safe=_TARGET_SAFE)}" if parts.query else ""
    )
    literal = f"[{host}]" if ":" in host else host
    return _Target(
        given=url,
        url=httpcore.URL(scheme=parts.scheme, host=host, port=port, target=path),
        host=host,
        host_header=literal if port is None else f"{literal}:{port}",
    )


class _CheckedBackend(httpcore.AnyIOBackend):
    """Resolves a host itself and connects only to addresses it has checked, so the address checked is the address
    used. httpcore still starts TLS with the URL's host as `server_hostname` (`AsyncHTTPConnection._connect`), so
    certificates are verified against the name, not against the IP literal connected to."""

    def __init__(self, allow_private_networks: bool, label: str = "image URL") -> None:
        self._allow_private_networks = allow_private_networks
        self._label = label

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        unresolved = FetchRefused("file_download_error", f"could not resolve the {self._label} host {host!r}")
        try:
            found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
        except (OSError, UnicodeError, ValueError):
            raise unresolved from None
        if not self._allow_private_networks and not all(is_public_address(address) for address in addresses):
            raise FetchRefused(
                "file_download_error",
                f"the {self._label} host {host!r} resolves to a private or reserved address, which this service "
                "does not fetch from",
            )
        failure: Exception = unresolved
        for address in addresses:
            try:
                return await super().connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        raise failure


async def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """The body of `url` (a client's image input, an adapter), if the policy allows fetching it; `FetchRefused`
    otherwise."""
    target = _target(url, policy.allowed_hosts, policy.label)
    try:
        with anyio.fail_after(policy.timeout_s):
            backend = _CheckedBackend(policy.allow_private_networks, policy.label)
            async with httpcore.AsyncConnectionPool(network_backend=backend, retries=0) as pool:
                for _ in range(policy.max_redirects + 1):
                    body, location = await _get(pool, target, policy)
                    if location is None:
                        return body
                    target = _target(urljoin(target.given, location), policy.allowed_hosts, "redirect")
    except TimeoutError:
        raise FetchRefused(
            "file_download_error", f"{policy.label} host {target.host!r} did not answer within {policy.timeout_s:g} s"
        ) from None
    except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
        logger.info("%s from %r: could not connect: %r", policy.label, target.host, error)
        raise FetchRefused(
            "file_download_error", f"could not connect to the {policy.label} host {target.host!r}"
        ) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException) as error:
        logger.info("%s from %r: connection failed: %r", policy.label, target.host, error)
        raise FetchRefused(
            "file_download_error", f"the connection to {policy.label} host {target.host!r} failed"
        ) from None
    raise FetchRefused(
        "file_download_error", f"{policy.label} {url!r} redirected more than {policy.max_redirects} times"
    )


async def _get(pool: httpcore.AsyncConnectionPool, target: _Target, policy: FetchPolicy) -> tuple[bytes, str | None]:
    """One GET: the body of a 2xx, or the `Location` of a redirect."""
    max_bytes = policy.max_bytes
    headers = [(b"Host", target.host_header.encode()), (b"Accept", b"*/*")]
    async with pool.stream("GET", target.url, headers=headers) as response:
        fields = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers}
        if response.status in _REDIRECTS and "location" in fields:
            return b"", fields["location"]
        if not 200 <= response.status < 300:
            raise FetchRefused(
                "file_download_error", f"{policy.label} host {target.host!r} answered HTTP {response.status}"
            )
        too_large = FetchRefused("file_too_large", f"the file at {target.host!r} is larger than {max_bytes} bytes")
        if fields.get("content-length", "").strip().isdigit() and int(fields["content-length"]) > max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks), None
