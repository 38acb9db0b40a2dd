"""The route table: a request path's prefix picks the proxy, on whole path segments."""

from __future__ import annotations

from collections.abc import Iterable


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
