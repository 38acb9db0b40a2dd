"""The environment that sends a program through keyswap's forward listener (`keyswap
run`): the proxy variables in both spellings, since tools read one or the other (curl
only the lower-case http_proxy), an empty NO_PROXY, and keyswap's CA for the TLS stacks
programs use."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from keyswap.net.urls import hostport

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
# Empty: every host goes through keyswap, which refuses the ones it does not serve
# (a NO_PROXY inherited from the shell would let a program reach them around it).
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
# Each replaces its tool's own CA store: OpenSSL (and Python's ssl, Go, Ruby), requests,
# curl, git. They get the bundle of the system's CAs and keyswap's (forward/trust.py).
BUNDLE_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
# Node adds this file to its own CAs, and honours the proxy variables only when asked
# to (NODE_USE_ENV_PROXY, in recent releases; older ones ignore both).
NODE_VARS = {"NODE_USE_ENV_PROXY": "1"}
CA_VARS = ("NODE_EXTRA_CA_CERTS",)


def proxy_url(text: str) -> str:
    """A forward listener's URL as `--via` takes it: `http://HOST:PORT`, nothing else.
    Raises ValueError."""
    try:
        url = urlsplit(text.strip())
        port = url.port
    except ValueError as e:
        raise ValueError(f"'{text}' is not http://HOST:PORT: {e}") from None
    if url.scheme != "http" or not url.hostname or port is None:
        raise ValueError(f"'{text}' is not http://HOST:PORT (keyswap's forward listener)")
    if url.username is not None or url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"'{text}' is not http://HOST:PORT: give the address alone")
    return f"http://{hostport(url.hostname, port)}"


def variables(proxy: str, ca_cert: Path, bundle: Path) -> dict[str, str]:
    """The variables for a program that goes through the forward listener at `proxy`,
    trusting `ca_cert` (keyswap's CA) and `bundle` (the system's CAs and keyswap's)."""
    return {
        **dict.fromkeys(PROXY_VARS, proxy),
        **dict.fromkeys(NO_PROXY_VARS, ""),
        **dict.fromkeys(BUNDLE_VARS, str(bundle)),
        **dict.fromkeys(CA_VARS, str(ca_cert)),
        **NODE_VARS,
    }
