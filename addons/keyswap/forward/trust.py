"""What a program run through forward mode trusts. Most TLS stacks take one CA file in
place of their own store (OpenSSL's SSL_CERT_FILE, requests, curl, git): they get a
bundle of the system's CAs and keyswap's, so that the hosts keyswap tunnels untouched,
whose certificates are their own, still verify. Node adds a file to its own CAs: it
gets keyswap's CA alone."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

import certifi

from keyswap.forward.ca import CA

BUNDLE = "keyswap-bundle.pem"


def system_cas(bundle: Path) -> Path:
    """The CA file this machine's TLS stacks trust: the one `$SSL_CERT_FILE` names, else
    OpenSSL's default, else certifi's (which httpx and mitmproxy bring). Never `bundle`
    itself: a `keyswap run` inside another sees its SSL_CERT_FILE."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file() and not _same(Path(candidate), bundle):
            return Path(candidate)
    return Path(certifi.where())


def bundle(ca: CA) -> Path:
    """`keyswap-bundle.pem` beside the CA: the system's CAs, then keyswap's; written again
    whenever either has changed (atomically: a program reading it never sees half a
    file). Raises OSError when the folder cannot be written."""
    path = ca.folder / BUNDLE
    system = system_cas(path).read_bytes()
    wanted = system.rstrip(b"\n") + b"\n\n# keyswap CA (forward mode)\n" + ca.pem
    if path.is_file() and path.read_bytes() == wanted:
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{BUNDLE}.", suffix=".tmp", dir=ca.folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(wanted)
        os.chmod(tmp, 0o644)  # certificates only: every program of the machine may read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # `b` not written yet
        return False
