"""keyswap's CA: made once in its folder, with mitmproxy's file names and a private key
only its owner reads; its fingerprint is the certificate's SHA-256."""

import stat
import subprocess
from pathlib import Path

import pytest

from keyswap.forward import ca


def test_made_once_then_found(tmp_path: Path) -> None:
    first = ca.ensure(tmp_path / "keyswap-ca")
    again = ca.ensure(tmp_path / "keyswap-ca")
    assert first.created and not again.created
    assert (first.sha256, first.pem) == (again.sha256, again.pem)
    assert first.cert_path.name == "mitmproxy-ca-cert.pem"  # mitmproxy's confdir reads it
    key = tmp_path / "keyswap-ca" / "mitmproxy-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in first.pem and b"PRIVATE KEY" in key.read_bytes()


def test_the_fingerprint_is_what_openssl_says(tmp_path: Path) -> None:
    found = ca.ensure(tmp_path)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(found.cert_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().split("=", 1)[1] == found.sha256


def test_the_folder_is_beside_the_config_unless_named(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "keyswap.yaml"
    assert ca.folder_for(config) == (tmp_path / "conf" / "keyswap-ca").resolve()
    assert ca.folder_for(config, tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_a_broken_ca_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "mitmproxy-ca.pem").write_text("not a key")
    (tmp_path / "mitmproxy-ca-cert.pem").write_text("not a certificate")
    with pytest.raises(ValueError):
        ca.ensure(tmp_path)
