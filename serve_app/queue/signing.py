"""Webhook signatures as fal makes them: ED25519 over the request id, the user id, a timestamp and the
body's hex SHA-256, joined by newlines; the public key published as a JWKS, so a receiver written for
fal's webhooks verifies ours unchanged.

The private key comes from the environment variable `queue.webhook_signing_key_env` names (a Secret:
PEM, or the base64 of the 32-byte seed); without one, a key is generated once and kept where every
job-queue replica finds it: in Redis, or for the in-process store in a file beside the model cache.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HEADERS = ("X-Fal-Webhook-Request-Id", "X-Fal-Webhook-User-Id", "X-Fal-Webhook-Timestamp", "X-Fal-Webhook-Signature")


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()


class WebhookSigner:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public = public
        self.key_id = hashlib.sha256(public).hexdigest()[:16]

    @classmethod
    def from_seed(cls, seed_b64: str) -> WebhookSigner:
        return cls(Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64)))

    @classmethod
    def from_env(cls, variable: str) -> WebhookSigner | None:
        """The key in `variable` (PEM, or the base64 of the 32-byte seed), None when it is unset."""
        value = os.environ.get(variable, "").strip()
        if not value:
            return None
        if value.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(value.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{variable} holds a private key that is not Ed25519")
            return cls(key)
        return cls.from_seed(value)

    @classmethod
    def kept_in_file(cls, path: Path) -> WebhookSigner:
        """The key in `path`, made there (readable by its owner only) on first use."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(new_seed())
        except FileExistsError:
            pass
        return cls.from_seed(path.read_text().strip())

    def headers(self, request_id: str, user_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """fal's four headers for one delivery attempt of `body` (its timestamp is the attempt's)."""
        timestamp = str(int(now if now is not None else time.time()))
        signature = self._key.sign(signed_message(request_id, user_id, timestamp, body)).hex()
        return dict(zip(HEADERS, (request_id, user_id, timestamp, signature), strict=True))

    def jwks(self) -> dict:
        """The public key as a JSON Web Key Set (RFC 8037's OKP keys), as fal publishes its own."""
        x = base64.urlsafe_b64encode(self._public).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "alg": "EdDSA", "use": "sig"}]}


def new_seed() -> str:
    """A fresh private key: the base64 of its 32-byte seed."""
    seed = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed).decode()
