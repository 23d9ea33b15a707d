"""Make a self-signed certificate for localhost, so fal clients (HTTPS only) can reach a local service.

    python -m sdxl_client.dev_cert --out certs    # writes certs/localhost.crt and certs/localhost.key

Then `serve run configs/local-tls.yaml` and point clients at it with SSL_CERT_FILE=certs/localhost.crt.
For local use only: production TLS belongs to your load balancer or a real certificate.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_localhost_certificate(directory: Path, days: int = 365) -> tuple[Path, Path]:
    """Write `localhost.crt` (a CA-flagged self-signed cert for localhost and 127.0.0.1) and its key."""
    return write_self_signed_certificate(directory, "localhost", addresses=("127.0.0.1",), days=days)


def write_self_signed_certificate(
    directory: Path, name: str, addresses: tuple[str, ...] = (), days: int = 365
) -> tuple[Path, Path]:
    """Write `<name>.crt`, a CA-flagged self-signed cert for the DNS name `name` (and `addresses`), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternative_names = [x509.DNSName(name), *(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses)]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        # A trust anchor for clients that are given this file as their CA bundle (SSL_CERT_FILE).
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("certs"))
    cert_path, key_path = write_localhost_certificate(parser.parse_args().out)
    print(f"wrote {cert_path} and {key_path}")


if __name__ == "__main__":
    main()
