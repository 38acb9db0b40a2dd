"""Where a request goes: `<route>/<rest>` onto the target's base URL, or the full-URL
form restricted to the target's origin and its `allowed_hosts`."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote, urlsplit

from mitmproxy import http

from keyswap.config.model import Target
from keyswap.gateway import problem
from keyswap.net import fields
from keyswap.net.urls import authority, origin_of

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

_FULL_URL = re.compile(r"/+(https?):", re.IGNORECASE)


class Refused(ValueError):
    """The request names a destination the proxy may not reach."""


class Destination(NamedTuple):
    """Where the request goes, and its path relative to the target (for rules). A named
    tuple: built once per request, and a frozen dataclass costs several times as much."""

    scheme: str
    host: str
    port: int
    path: str  # with the query
    relative: str  # decoded, dot-free, without the query

    @property
    def url(self) -> str:
        return origin_of(self.scheme, self.host, self.port) + self.path


def decoded(path: str) -> str:
    """Percent-decoded until stable (so `%252e` cannot hide a `.`); `\\` counts as `/`."""
    for _ in range(4):
        once = unquote(path, errors="surrogateescape")
        if once == path:
            break
        path = once
    return path.replace("\\", "/")


def normalize(path: str) -> str:
    """The decoded path with `.` and `..` resolved. Raises `Refused` when `..` would
    climb above the start."""
    return _dot_free(decoded(path))


def _dot_free(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if not out:
                raise Refused("the path climbs above the target's base path ('..')")
            out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return "/" + "/".join(out)


@lru_cache(maxsize=256)
def _split_base(base_url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path) of a target's base URL, parsed once per URL
    rather than once per request."""
    base = urlsplit(base_url)
    port = base.port or (443 if base.scheme == "https" else 80)
    return base.scheme, base.hostname or "", port, base.path.rstrip("/")


def resolve(target: Target, rest: str, query: str) -> Destination:
    """The destination of `rest` (the path after the route) on `target`."""
    base_scheme, base_host, base_port, base_path = _split_base(target.base_url)
    suffix = f"?{query}" if query else ""

    clean = decoded(rest)
    if _FULL_URL.match(clean):
        return _full_url(target, rest, suffix, (base_scheme, base_host, base_port), base_path)

    relative = _dot_free(clean)
    path = base_path + (rest if rest.startswith("/") else "/" + rest if rest else "")
    return Destination(base_scheme, base_host, base_port, (path or "/") + suffix, relative)


def _full_url(
    target: Target, rest: str, suffix: str, base: tuple[str, str, int], base_path: str
) -> Destination:
    raw = rest.lstrip("/")
    if not re.match(r"https?://", raw, re.IGNORECASE):
        raise Refused("a full URL must be written plainly as https://host/path")
    try:
        parts = urlsplit(raw)
    except ValueError:  # an unbalanced [ or ] in the authority
        raise Refused("the full URL is malformed") from None
    if "@" in parts.netloc:
        raise Refused("a full URL may not carry user information ('@')")
    try:
        port = parts.port
    except ValueError:
        raise Refused("the full URL has an invalid port") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if not host:
        raise Refused("the full URL names no host")
    port = port or (443 if scheme == "https" else 80)
    origin = origin_of(scheme, host, port)
    relative = normalize(parts.path or "/")
    if origin == origin_of(*base):
        if base_path and not (relative == base_path or relative.startswith(base_path + "/")):
            raise Refused(f"the full URL leaves the target's base path {base_path}")
        relative = relative[len(base_path) :] or "/"
    elif origin not in target.allowed_hosts:
        raise Refused(f"{origin} is neither the target's origin nor in its allowed_hosts")
    return Destination(scheme, host, port, (parts.path or "/") + suffix, relative)


class Rewrite:
    """Sends a granted request to its target: scheme, host, port, path and Host header."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.DESTINATION not in flow.metadata:
            return
        dest = flow.metadata[problem.DESTINATION]
        request = flow.request
        # The raw fields: mitmproxy's host and port setters rewrite the Host header each
        # time, and its Headers API is slow; it is set once below. Origin-form, whatever
        # form the client used.
        data = request.data
        data.scheme = dest["scheme"].encode()
        data.host = dest["host"]
        data.port = dest["port"]
        data.path = dest["path"].encode("utf-8", "surrogateescape")
        host = authority(dest["host"], dest["port"], dest["scheme"])
        # HTTP/2 and 3 carry it as :authority, and a Host field only when the client sent one.
        h2 = request.is_http2 or request.is_http3
        request.authority = host if h2 else ""
        if not h2 or "host" in request.headers:
            fields.put(request.headers, b"host", host.encode("utf-8", "surrogateescape"))
        target_id = flow.metadata[problem.TARGET]
        problem.decide(flow, problem.GRANTED, f"forwarded to target '{target_id}'")
