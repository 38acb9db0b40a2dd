"""Raw header access for the per-request path.

mitmproxy's `Headers` re-encodes the name, lower-cases every field through a static
method and raises KeyError for an absent name on every `get` and `[]=`. keyswap reads
and writes `headers.fields`, the tuple of raw `(name, value)` pairs, directly, with the
same meaning: names match case-insensitively, repeated fields fold with ", ".

Most of the work on headers depends only on their names: where the token, the origin or
the content length is, which fields a filter drops, which a log row masks. Real traffic
repeats a few name sequences (one per client library, one per server), so each distinct
sequence is analysed once into a `Shape`, and the decisions made on it are cached there.
A request then costs a tuple lookup per header pass instead of a Python step per field,
which in CPython is what a gateway's header handling mostly costs."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from mitmproxy.http import Headers

Fields = tuple[tuple[bytes, bytes], ...]

# Distinct name sequences kept; a client inventing header names per request only makes
# the cache start over, never grow without bound.
SHAPES_KEPT = 4096


class Shape:
    """What one sequence of raw header names means."""

    __slots__ = ("decisions", "first", "lowered", "names", "repeated", "text")

    def __init__(self, names: tuple[bytes, ...]) -> None:
        self.names = names
        self.lowered = tuple(n.lower() for n in names)
        self.first: dict[bytes, int] = {}  # lower-cased name -> its first position
        for i, name in enumerate(self.lowered):
            self.first.setdefault(name, i)
        self.repeated = len(self.first) != len(self.lowered)
        self.text = tuple(n.decode("latin-1") for n in self.lowered)
        self.decisions: dict[Hashable, Any] = {}

    def decide(self, key: Hashable, decide: Callable[[Shape], Any]) -> Any:
        """`decide(self)`, computed once per shape and `key` (which names the decision
        and everything it depends on besides the names)."""
        try:
            return self.decisions[key]
        except KeyError:
            value = self.decisions[key] = decide(self)
            return value


_SHAPES: dict[tuple[bytes, ...], Shape] = {}
# The header tuple looked at last: consecutive stages look at the same headers. Holding
# the tuple keeps its identity from being reused while it is remembered. It is read once
# per call, so that a call sees one pair whole even if another thread replaces it.
_last: tuple[Fields, Shape] = ((), Shape(()))


def shape(headers: Headers) -> Shape:
    """The shape of `headers`' current fields."""
    fields: Fields = headers.fields
    last = _last
    if fields is last[0]:
        return last[1]
    return remember(fields, shape_of(tuple([k for k, _ in fields])))


def shape_of(names: tuple[bytes, ...]) -> Shape:
    """The shape of a sequence of raw header names."""
    found = _SHAPES.get(names)
    if found is None:
        if len(_SHAPES) >= SHAPES_KEPT:
            _SHAPES.clear()
        found = _SHAPES[names] = Shape(names)
    return found


def remember(fields: Fields, found: Shape) -> Shape:
    """Note that `fields` has shape `found`: a stage that builds new fields from a known
    shape saves the next stage from reading the names again."""
    global _last
    _last = (fields, found)
    return found


def snapshot(headers: Headers) -> Headers:
    """`headers` as they are now: a Headers sharing the current fields tuple, which later
    edits (they replace the tuple, never change it) leave as it is."""
    frozen: Headers = object.__new__(Headers)
    frozen.fields = headers.fields
    return frozen


def get(headers: Headers, name: bytes) -> str | None:
    """The value of header `name` (given in lower case), or None when absent."""
    found = shape(headers)
    i = found.first.get(name)
    if i is None:
        return None
    fields = headers.fields
    if found.repeated:
        raw = b", ".join([v for n, (_, v) in zip(found.lowered, fields, strict=True) if n == name])
    else:
        raw = fields[i][1]
    return raw.decode("utf-8", "surrogateescape")


def put(headers: Headers, name: bytes, value: bytes) -> None:
    """Set header `name` (lower case) to `value`: the first field of that name takes the
    value in place, later ones are dropped, and it is appended when there was none."""
    found = shape(headers)
    fields: Fields = headers.fields
    i = found.first.get(name)
    if i is None:
        appended = found.decide(("append", name), lambda s: shape_of((*s.names, name)))
        headers.fields = (*fields, (name, value))
        remember(headers.fields, appended)
    elif not found.repeated:
        headers.fields = (*fields[:i], (fields[i][0], value), *fields[i + 1 :])
        remember(headers.fields, found)
    else:
        rest = zip(found.lowered[i + 1 :], fields[i + 1 :], strict=True)
        headers.fields = (*fields[:i], (fields[i][0], value), *(f for n, f in rest if n != name))
