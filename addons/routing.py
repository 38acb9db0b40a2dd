"""Routing: the request path's prefix picks the proxy, on whole path segments."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap import problem
from keyswap.config import RESERVED_PREFIX

if TYPE_CHECKING:
    from keyswap.settings import Settings


class RouteTable:
    """Longest-prefix match on whole segments: `/api/crm` never matches `/api/crm-prod/x`."""

    def __init__(self, routes: Iterable[tuple[str, str]]) -> None:
        self._routes: dict[str, str] = {}
        for route, proxy_id in routes:
            self._routes.setdefault(route, proxy_id)
        self._lengths = sorted({len(r) for r in self._routes}, reverse=True)

    def match(self, path: str) -> tuple[str, str, str] | None:
        """`(proxy_id, route, rest)` for a path (query excluded), or None. `rest` keeps
        the leading '/' (or is empty when the path is the route itself)."""
        for n in self._lengths:
            prefix = path[:n]
            proxy_id = self._routes.get(prefix)
            if proxy_id is None:
                continue
            rest = path[n:]
            if prefix == "/":
                return proxy_id, prefix, path
            if rest == "" or rest.startswith("/"):
                return proxy_id, prefix, rest
        return None


_PROCESS = os.urandom(4).hex()  # tells gateways (and restarts) apart
_SEQUENCE = itertools.count()


def new_request_id() -> str:
    """26 hex digits, time-ordered and unique: milliseconds, process, sequence."""
    return f"{time.time_ns() // 1_000_000:012x}{_PROCESS}{next(_SEQUENCE) % 0x1000000:06x}"


class Router:
    """Gives every flow its request id and finds the proxy its path belongs to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata[problem.REQUEST_ID] = new_request_id()
        raw = flow.request.data.path
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            flow.metadata[problem.PATH] = raw.decode("utf-8", "replace")
            problem.deny(flow, 400, "bad-request", "the path is not UTF-8; percent-encode it")
            return
        flow.metadata[problem.PATH] = text
        path = text.partition("?")[0]
        if path == RESERVED_PREFIX or path.startswith(RESERVED_PREFIX + "/"):
            flow.metadata[problem.RESERVED] = True
            return
        match = self.settings.runtime.routes.match(path)
        if match is None:
            problem.deny(flow, 404, "unknown-route", "no proxy is configured for this path")
            return
        proxy_id, route, rest = match
        flow.metadata[problem.PROXY] = proxy_id
        flow.metadata[problem.ROUTE] = route
        flow.metadata[problem.REST] = rest
