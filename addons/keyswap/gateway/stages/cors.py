"""CORS: preflights from allowed origins are answered here; other origins are refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap.config.model import Proxy
from keyswap.config.tokens import TOKEN_HEADERS
from keyswap.gateway import problem
from keyswap.net import fields

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

MAX_AGE_S = "600"


def origin_allowed(proxy: Proxy, origin: str) -> bool:
    return "*" in proxy.allowed_origins or origin.lower().rstrip("/") in proxy.allowed_origins


class Cors:
    """Browser access: an `Origin` must be in the proxy's `allowed_origins`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.PROXY not in flow.metadata:
            return
        origin = fields.get(flow.request.headers, b"origin")
        if origin is None:
            return
        proxy_id = flow.metadata[problem.PROXY]
        proxy = self.settings.runtime.config.proxies[proxy_id]
        if not origin_allowed(proxy, origin):
            problem.deny(flow, 403, "origin", f"origin {origin} may not call this proxy")
            return
        flow.metadata[problem.CORS_ORIGIN] = origin
        request = flow.request
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            methods = proxy.methods or [request.headers["access-control-request-method"].upper()]
            requested = request.headers.get("access-control-request-headers", "")
            allow_headers = requested or ", ".join(("content-type", *TOKEN_HEADERS))
            flow.response = http.Response.make(
                204,
                b"",
                {
                    "access-control-allow-methods": ", ".join(methods),
                    "access-control-allow-headers": allow_headers,
                    "access-control-max-age": MAX_AGE_S,
                },
            )
            flow.metadata[problem.ANSWERED] = True
            problem.decide(flow, problem.GRANTED, "CORS preflight answered by keyswap")
            problem.stamp(flow, flow.response)
