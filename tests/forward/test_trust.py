"""The bundle a program run through forward mode trusts: the system's CAs and keyswap's,
usable by OpenSSL, written again only when it is stale, and never built from itself."""

import ssl
from pathlib import Path

import certifi
import pytest

from keyswap.forward import ca, trust


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> ca.CA:
    return ca.ensure(tmp_path_factory.mktemp("keyswap-ca"))


def cas_in(cafile: Path) -> int:
    """How many CA certificates OpenSSL loads from the file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(cafile))
    return int(context.cert_store_stats()["x509_ca"])


def test_the_bundle_holds_the_system_cas_and_keyswaps(authority: ca.CA) -> None:
    bundle = trust.bundle(authority)
    assert bundle == authority.folder / "keyswap-bundle.pem"
    system = trust.system_cas(bundle)
    assert cas_in(bundle) == cas_in(system) + 1
    assert bundle.read_bytes().startswith(system.read_bytes().rstrip(b"\n"))
    assert bundle.read_bytes().endswith(authority.pem)
    assert bundle.stat().st_mode & 0o777 == 0o644


def test_it_is_written_again_only_when_stale(authority: ca.CA) -> None:
    bundle = trust.bundle(authority)
    inode = bundle.stat().st_ino
    assert trust.bundle(authority).stat().st_ino == inode  # current: left alone
    bundle.write_bytes(b"stale")
    assert trust.bundle(authority).read_bytes().endswith(authority.pem)
    assert not [p for p in authority.folder.iterdir() if p.name.endswith(".tmp")]


def test_the_system_cas_are_the_environments_but_never_the_bundle_itself(
    authority: ca.CA, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    corporate = tmp_path / "corporate.pem"
    corporate.write_bytes(Path(certifi.where()).read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(corporate))
    bundle = trust.bundle(authority)
    assert trust.system_cas(bundle) == corporate
    assert cas_in(bundle) == cas_in(corporate) + 1
    # a keyswap run inside another sees the bundle as its SSL_CERT_FILE: no base for it
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    base = trust.system_cas(bundle)
    assert base.is_file() and not base.samefile(bundle)
    first = trust.bundle(authority).read_bytes()
    assert trust.bundle(authority).read_bytes() == first  # it does not grow
    assert cas_in(bundle) == cas_in(base) + 1
