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
NEVER_NAMED = frozenset({"transfer-encoding", "content-length", "connection", "upgrade"})
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
# The target's own keyswap-* and CORS headers never reach the client.
RESPONSE_PREFIXES = ("keyswap-", "access-control-")


def hop_by_hop(headers: http.Headers) -> set[str]:
    """The hop-by-hop names to drop from these headers (those the Connection header
    names included); Connection itself is cut down to what mitmproxy needs."""
    connection = headers.get("connection")
    tokens = [t.strip().lower() for t in (connection or "").split(",") if t.strip()]
    websocket = "upgrade" in tokens and headers.get("upgrade", "").lower() == "websocket"
    drop = set(HOP_BY_HOP).union(tokens) - NEVER_NAMED
    kept = [t for t in tokens if t in CONNECTION_TOKENS or (websocket and t == "upgrade")]
    if not kept:
        drop.add("connection")
    elif kept != tokens:
        headers["connection"] = ", ".join(kept)
    if not websocket:
        drop.add("upgrade")
    return drop


def drop_headers(headers: http.Headers, names: set[str], prefixes: tuple[str, ...] = ()) -> None:
    """Remove every header named in `names` (lower case) or starting with a prefix, in
    one pass over the raw fields (mitmproxy's per-name removal scans them each time)."""
    drop = {n.encode() for n in names}
    starts = tuple(p.encode() for p in prefixes)
    headers.fields = tuple(
        (k, v)
        for k, v in headers.fields
        if (low := k.lower()) not in drop and not low.startswith(starts)
    )


def set_headers(headers: http.Headers, values: dict[str, str]) -> None:
    for name, value in values.items():
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
        rules = self.settings.runtime.config.proxies[flow.metadata[problem.PROXY]].request_headers
        drop = hop_by_hop(headers) | INFRASTRUCTURE | set(TOKEN_HEADERS) | set(rules.strip)
        drop_headers(headers, drop, INFRASTRUCTURE_PREFIXES)
        set_headers(headers, rules.set)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or flow.metadata.get(problem.ANSWERED):
            return
        headers = response.headers
        proxy = self.settings.runtime.config.proxies.get(flow.metadata.get(problem.PROXY, ""))
        rules = proxy.response_headers if proxy is not None else HeaderRules()
        drop_headers(headers, hop_by_hop(headers) | set(rules.strip), RESPONSE_PREFIXES)
        set_headers(headers, rules.set)
        problem.stamp(flow, response)
