import pytest
from mitmproxy.http import Headers

from keyswap import fields

RAW = [
    (b"Host", b"a.example"),
    (b"Accept", b"*/*"),
    (b"X-Multi", b"1"),
    (b"x-multi", b"2"),
    (b"X-Bytes", "caf\u00e9".encode()),
    (b"X-Odd", b"\xff"),
]


@pytest.mark.parametrize("name", ["host", "HOST", "x-multi", "x-bytes", "x-odd", "absent"])
def test_get_agrees_with_mitmproxy(name: str) -> None:
    headers = Headers(RAW)
    assert fields.get(headers, name.lower().encode()) == headers.get(name)


@pytest.mark.parametrize("name", ["host", "x-multi", "new"])
def test_put_agrees_with_mitmproxy(name: str) -> None:
    ours, theirs = Headers(RAW), Headers(RAW)
    fields.put(ours, name.encode(), b"v")
    theirs[name] = "v"
    assert ours.fields == theirs.fields


def test_put_replaces_in_place_and_keeps_the_original_spelling() -> None:
    headers = Headers(RAW)
    fields.put(headers, b"host", b"b.example")
    assert headers.fields[0] == (b"Host", b"b.example")
    assert len(headers.fields) == len(RAW)
