"""Header plans: what must not cross the gateway (hop-by-hop, infrastructure, proxy
credential headers) and a proxy's own `strip`/`set` rules, compiled once per proxy into
byte-level plans that the header filter applies to each message."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import compress

from mitmproxy import http

from keyswap.config.model import HeaderRules
from keyswap.config.tokens import TOKEN_HEADERS
from keyswap.net import fields

# Hop-by-hop headers (RFC 9110 7.6.1) that keyswap drops itself. Framing
# (transfer-encoding, content-length) stays with mitmproxy, which re-frames bodies, and
# so do Connection's own `close`/`keep-alive`: mitmproxy reads them to manage both
# connections. Upgrade survives only for a WebSocket upgrade.
HOP_BY_HOP = frozenset(
    {"keep-alive", "proxy-connection", "te", "proxy-authenticate", "proxy-authorization"}
)
CONNECTION_TOKENS = frozenset({"close", "keep-alive"})
# Connection may not remove what frames the message or says where it goes: naming
# `host` would leave the target without one.
NEVER_NAMED = frozenset({"transfer-encoding", "content-length", "connection", "upgrade", "host"})
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


def hop_by_hop(headers: http.Headers) -> frozenset[bytes]:
    """The hop-by-hop names to drop from these headers (those the Connection header
    names included); Connection itself is cut down to what mitmproxy needs."""
    connection = fields.get(headers, b"connection")
    if not connection:
        return _WITHOUT_CONNECTION
    websocket = "upgrade" in connection.lower() and (
        (fields.get(headers, b"upgrade") or "").lower() == "websocket"
    )
    drop, rewritten = _connection_rules(connection, websocket)
    if rewritten is not None:
        fields.put(headers, b"connection", rewritten.encode())
    return drop


@lru_cache(maxsize=256)
def _connection_rules(
    connection: str, websocket_upgrade: bool
) -> tuple[frozenset[bytes], str | None]:
    """What a Connection header value means: the names to drop, and the value to send
    instead (None: unchanged). Cached: a handful of values cover almost all traffic."""
    tokens = [t.strip().lower() for t in connection.split(",") if t.strip()]
    websocket = websocket_upgrade and "upgrade" in tokens
    drop = set(HOP_BY_HOP).union(tokens) - NEVER_NAMED
    kept = [t for t in tokens if t in CONNECTION_TOKENS or (websocket and t == "upgrade")]
    if not kept:
        drop.add("connection")
    if not websocket:
        drop.add("upgrade")
    rewritten = ", ".join(kept) if kept and kept != tokens else None
    return frozenset(n.encode() for n in drop), rewritten


_WITHOUT_CONNECTION = frozenset(n.encode() for n in (*HOP_BY_HOP, "connection", "upgrade"))


@dataclass(frozen=True)  # hashable by content: equal plans share decisions across reloads
class Plan:
    """One direction's header handling for one proxy, in raw bytes, built once per
    config: what to drop (by name or prefix) and what to set."""

    drop: frozenset[bytes]
    prefixes: tuple[bytes, ...]
    add: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, always: Iterable[str], prefixes: Iterable[str], rules: HeaderRules) -> Plan:
        # A header the rules set replaces the client's or target's: it is dropped first.
        names = (*always, *rules.strip, *rules.set)
        return cls(
            frozenset(n.lower().encode() for n in names),
            tuple(p.encode() for p in prefixes),
            tuple((k.encode(), v.encode()) for k, v in rules.set.items()),
        )

    def apply(self, headers: http.Headers) -> None:
        """Drop and set in one step: which fields go is decided once per name sequence
        (and Connection meaning), then applied with a C-level selection."""
        hop = hop_by_hop(headers)
        found = fields.shape(headers)
        keep, after = found.decide((self, hop), lambda shape: self._keep(shape, hop))
        kept = headers.fields if keep is None else tuple(compress(headers.fields, keep))
        headers.fields = kept + self.add
        fields.remember(headers.fields, after)

    def _keep(
        self, shape: fields.Shape, hop: frozenset[bytes]
    ) -> tuple[tuple[bool, ...] | None, fields.Shape]:
        """Which fields of this shape stay (None: all of them), and the shape after."""
        drop, starts = self.drop | hop, self.prefixes
        keep = tuple(n not in drop and not n.startswith(starts) for n in shape.lowered)
        after = fields.shape_of((*compress(shape.names, keep), *(k for k, _ in self.add)))
        return (None if all(keep) else keep), after


def request_plan(rules: HeaderRules) -> Plan:
    return Plan.of((*INFRASTRUCTURE, *TOKEN_HEADERS), INFRASTRUCTURE_PREFIXES, rules)


def response_plan(rules: HeaderRules) -> Plan:
    return Plan.of((), RESPONSE_PREFIXES, rules)


UNKNOWN_PROXY_RESPONSE = response_plan(HeaderRules())
