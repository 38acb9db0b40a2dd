import pytest
from mitmproxy.http import Headers

from keyswap.net import fields

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


def test_a_name_sequence_is_analysed_once_and_the_cache_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(fields, "SHAPES_KEPT", 3)
    monkeypatch.setattr(fields, "_SHAPES", {})
    first = fields.shape(Headers(RAW))
    again = fields.shape(Headers(list(RAW)))  # other objects, the same names
    assert first is again
    assert (first.repeated, first.first[b"x-multi"]) == (True, 2)
    for i in range(5):
        fields.shape(Headers([(f"x-{i}".encode(), b"v")]))
    assert len(fields._SHAPES) <= 3


def test_decisions_are_made_once_per_shape_and_key() -> None:
    shape = fields.shape(Headers(RAW))
    calls = []
    for _ in range(3):
        shape.decide(("test", 1), lambda s: calls.append(s) or len(s.lowered))
    assert calls == [shape]
    assert shape.decide(("test", 1), lambda s: 0) == len(RAW)
