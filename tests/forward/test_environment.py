"""The environment of a program run through forward mode: the proxy in both spellings,
an empty NO_PROXY, the bundle for the tools whose CA variable replaces their store, and
keyswap's CA alone for Node; `--via` takes a forward listener's address and nothing else."""

from pathlib import Path

import pytest

from keyswap.forward import environment


def test_the_variables() -> None:
    found = environment.variables("http://127.0.0.1:8081", Path("/ca.pem"), Path("/b.pem"))
    assert found == {
        "HTTPS_PROXY": "http://127.0.0.1:8081",
        "HTTP_PROXY": "http://127.0.0.1:8081",
        "https_proxy": "http://127.0.0.1:8081",
        "http_proxy": "http://127.0.0.1:8081",
        "NO_PROXY": "",
        "no_proxy": "",
        "SSL_CERT_FILE": "/b.pem",
        "REQUESTS_CA_BUNDLE": "/b.pem",
        "CURL_CA_BUNDLE": "/b.pem",
        "GIT_SSL_CAINFO": "/b.pem",
        "NODE_EXTRA_CA_CERTS": "/ca.pem",
        "NODE_USE_ENV_PROXY": "1",
    }


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
        (" http://gw.internal:8081/ ", "http://gw.internal:8081"),
        ("http://[::1]:8081", "http://[::1]:8081"),
        ("HTTP://Gw.Internal:8081", "http://gw.internal:8081"),
    ],
)
def test_via_takes_a_forward_listener(given: str, url: str) -> None:
    assert environment.proxy_url(given) == url


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("127.0.0.1:8081", "is not http://HOST:PORT"),
        ("https://127.0.0.1:8081", "is not http://HOST:PORT"),
        ("http://127.0.0.1", "is not http://HOST:PORT"),
        ("http://:8081", "is not http://HOST:PORT"),
        ("http://127.0.0.1:99999", "is not http://HOST:PORT"),
        ("http://127.0.0.1:port", "is not http://HOST:PORT"),
        ("http://user:pw@127.0.0.1:8081", "give the address alone"),
        ("http://127.0.0.1:8081/path", "give the address alone"),
        ("http://127.0.0.1:8081?q=1", "give the address alone"),
    ],
)
def test_via_refuses_anything_else(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        environment.proxy_url(given)
