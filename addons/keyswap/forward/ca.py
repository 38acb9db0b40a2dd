"""keyswap's certificate authority, which forward mode signs intercepted origins'
certificates with: made on first use in `keyswap-ca/` beside the config file (or a
folder the operator names; the nodes of a cluster share it like the config). Its files
have mitmproxy's names, so that mitmproxy's `confdir` option points at the folder as it
is; the private key is readable by its owner only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from mitmproxy.certs import CertStore
from mitmproxy.options import CONF_BASENAME

FOLDER = "keyswap-ca"
KEY_SIZE = 2048  # mitmproxy's default for its CA


@dataclass(frozen=True)
class CA:
    """The CA's folder, its certificate (PEM) and the certificate's SHA-256 fingerprint."""

    folder: Path
    cert_path: Path
    pem: bytes
    sha256: str  # upper-case hex pairs joined by ':', as openssl and browsers show it
    created: bool  # made by this call


def folder_for(config_path: Path, ca_dir: Path | None = None) -> Path:
    """Where the CA lives: `ca_dir`, else `keyswap-ca/` beside the config file."""
    return ca_dir if ca_dir is not None else config_path.resolve().parent / FOLDER


def ensure(folder: Path) -> CA:
    """The CA in `folder`, made there first if it has none. Raises OSError (the folder
    cannot be written) or ValueError (a CA file there is not one)."""
    key_file = folder / f"{CONF_BASENAME}-ca.pem"
    created = not key_file.exists()
    if created:
        CertStore.create_store(
            folder, CONF_BASENAME, KEY_SIZE, organization="keyswap", cn="keyswap CA"
        )
    cert_path = folder / f"{CONF_BASENAME}-ca-cert.pem"
    pem = cert_path.read_bytes()
    digest = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())
    return CA(folder, cert_path, pem, ":".join(f"{b:02X}" for b in digest), created)
