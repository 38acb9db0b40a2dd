"""Header filtering: what the target must not see, and what the client must not get back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap import problem
from keyswap.config import HeaderRules
from keyswap.tokens import TOKEN_HEADERS

if TYPE_CHECKING:
    from keyswap.settings import Settings

# Hop-by-hop headers (RFC 9110 7.6.1) that keyswap drops itself. Framing
# (transfer-encoding, content-length) stays with mitmproxy, which re-frames bodies, and
# so do Connection's own `close`/`keep-alive`: mitmproxy reads them to manage both
# connections. Upgrade survives only for a WebSocket upgrade.
HOP_BY_HOP = frozenset(
    {"keep-alive", "proxy-connection", "te", "proxy-authenticate", "proxy-authorization"}
)
CONNECTION_TOKENS = frozenset({"close", "keep-alive"})
INFRASTRUCTURE = frozenset(
    {
        "x-request-id",
        "x-real-ip",
        "x-original-forwarded-for",
        "x-scheme",
        "x-request-start",
        "forwarded",
        "cdn-loop",
        "true-client-ip",
        "x-amzn-trace-id",
        "proxy-protocol",
    }
)
INFRASTRUCTURE_PREFIXES = ("x-forwarded-", "cf-")
KEYSWAP_PREFIX = "keyswap-"


def is_websocket_upgrade(headers: http.Headers) -> bool:
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return "upgrade" in connection and headers.get("upgrade", "").lower() == "websocket"


def drop_hop_by_hop(headers: http.Headers) -> None:
    """Remove hop-by-hop headers and those the Connection header names."""
    upgrade = is_websocket_upgrade(headers)
    tokens = [t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()]
    keep = {"transfer-encoding", "content-length", "connection", "upgrade"}
    for name in HOP_BY_HOP.union(tokens) - keep:
        headers.pop(name, None)
    kept = [t for t in tokens if t in CONNECTION_TOKENS or (upgrade and t == "upgrade")]
    if kept:
        headers["connection"] = ", ".join(kept)
    else:
        headers.pop("connection", None)
    if not upgrade:
        headers.pop("upgrade", None)


def drop_infrastructure(headers: http.Headers) -> None:
    for name in list(headers):
        lower = name.lower()
        if lower in INFRASTRUCTURE or lower.startswith(INFRASTRUCTURE_PREFIXES):
            headers.pop(name, None)


def apply_rules(headers: http.Headers, rules: HeaderRules) -> None:
    for name in rules.strip:
        headers.pop(name, None)
    for name, value in rules.set.items():
        headers[name] = value


class HeaderFilter:
    """Strips what must not cross the gateway, in both directions, and applies the
    proxy's own `request_headers` / `response_headers` settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.DESTINATION not in flow.metadata:
            return
        headers = flow.request.headers
        drop_hop_by_hop(headers)
        drop_infrastructure(headers)
        for name in TOKEN_HEADERS:
            headers.pop(name, None)
        proxy = self.settings.runtime.config.proxies[flow.metadata[problem.PROXY]]
        apply_rules(headers, proxy.request_headers)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or flow.metadata.get(problem.ANSWERED):
            return
        headers = response.headers
        drop_hop_by_hop(headers)
        for name in [n for n in headers if n.lower().startswith(KEYSWAP_PREFIX)]:
            headers.pop(name, None)
        proxy = self.settings.runtime.config.proxies.get(flow.metadata.get(problem.PROXY, ""))
        if proxy is not None:
            apply_rules(headers, proxy.response_headers)
        problem.stamp(flow, response)
