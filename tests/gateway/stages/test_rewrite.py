import pytest

from keyswap.config.model import Target
from keyswap.gateway.stages.rewrite import Refused, normalize, resolve

TARGET = Target.model_validate(
    {
        "base_url": "https://api.example.com/v2",
        "credential": "c",
        "allowed_hosts": ["https://uploads.example.com"],
    }
)


@pytest.mark.parametrize(
    ("rest", "query", "url", "relative"),
    [
        ("", "", "https://api.example.com/v2", "/"),
        ("/items", "a=1&b=%20", "https://api.example.com/v2/items?a=1&b=%20", "/items"),
        ("/a%2Fb", "", "https://api.example.com/v2/a%2Fb", "/a/b"),
        ("/a/../b", "", "https://api.example.com/v2/a/../b", "/b"),
        ("/https://api.example.com/v2/x", "q=1", "https://api.example.com/v2/x?q=1", "/x"),
        ("/https://api.example.com:443/v2", "", "https://api.example.com/v2", "/"),
        (
            "/https://uploads.example.com/any/path",
            "",
            "https://uploads.example.com/any/path",
            "/any/path",
        ),
    ],
)
def test_destinations(rest: str, query: str, url: str, relative: str) -> None:
    dest = resolve(TARGET, rest, query)
    assert dest.url == url
    assert dest.relative == relative


@pytest.mark.parametrize(
    ("rest", "message"),
    [
        ("/..", "climbs above"),
        ("/a/../../x", "climbs above"),
        ("/%2e%2e/x", "climbs above"),
        ("/%252e%252e/x", "climbs above"),
        ("/..%5cx", "climbs above"),
        ("/https://evil.test/", "neither the target's origin"),
        ("/http://api.example.com/v2/x", "neither the target's origin"),
        ("/https://api.example.com:8443/v2/x", "neither the target's origin"),
        ("/https://api.example.com@evil.test/", "user information"),
        ("/https://api.example.com/v1/x", "leaves the target's base path"),
        ("/https://api.example.com/v2/../v1", "climbs above|leaves"),
        ("/https:%2F%2Fevil.test/", "written plainly"),
        ("/https:/evil.test/", "written plainly"),
        ("/https://api.example.com:99999/", "invalid port"),
        ("/https://[abc/x", "malformed"),  # once a 500 and a traceback
        ("/https://abc]/x", "malformed|neither"),
    ],
)
def test_refusals(rest: str, message: str) -> None:
    with pytest.raises(Refused, match=message):
        resolve(TARGET, rest, "")


def test_normalize() -> None:
    assert normalize("/a/./b//c/../d") == "/a/b/d"
    assert normalize("") == "/"
