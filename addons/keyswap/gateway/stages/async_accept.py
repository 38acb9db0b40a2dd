"""`Prefer: respond-async`: a request that passed every check is stored and answered
`202 Accepted` with where to read its result; the deliveries stage sends it later, as
many times as it takes. The stored request is what the target may see of it: the path
the client sent without any token, the headers after the proxy's request filter (no
proxy credential, nothing token-shaped), the body. No target credential: that goes on
at delivery. It is committed before the 202 is sent."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, NamedTuple
from weakref import WeakKeyDictionary

from mitmproxy import http

from keyswap.config.tokens import SHAPE_BYTES as TOKEN_SHAPE
from keyswap.config.tokens import without_tokens
from keyswap.gateway import delivery, problem
from keyswap.gateway.runtime import NO_PLACES
from keyswap.gateway.stages.auth import TOKEN_ID, TOKEN_SHA256
from keyswap.gateway.stages.headers import filter_request
from keyswap.gateway.stages.swap import mask
from keyswap.net import fields
from keyswap.state import async_queue
from keyswap.state.backends import StateError
from keyswap.state.store import iso, new_request_id

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings
    from keyswap.gateway.stages.deliveries import Deliveries

RESULTS = "/_keyswap/requests/"


class Held(NamedTuple):
    """A request held for storing: its target, and what will be stored of it (taken
    before the flow is masked)."""

    target: str
    path: str
    headers: list[tuple[bytes, bytes]]
    key: str | None  # the client's Idempotency-Key


HELD = "keyswap.async_held"  # flow.metadata: a held request's body bound (GatewayStream reads it)
# Not stored: how this client framed and asked (delivery frames the body itself and puts
# the request's Idempotency-Key on every attempt), and what it accepts in return: a
# result is read as JSON, and a compressed answer could hide an echoed secret from the
# masking.
NOT_STORED = frozenset(
    {
        b"host",
        b"transfer-encoding",
        b"content-length",
        b"expect",
        b"idempotency-key",
        b"accept-encoding",
    }
)
# An Idempotency-Key a client may choose: printable ASCII, as the IETF draft's examples
# and every API that takes one; at most 255 characters.
_KEY = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")


def prefers_async(prefer: str | None) -> bool:
    """Whether a `Prefer` value (RFC 7240) asks for `respond-async`."""
    if not prefer or "respond-async" not in prefer.lower():
        return False
    return any(
        p.split(";")[0].split("=")[0].strip().lower() == "respond-async" for p in prefer.split(",")
    )


def other_preferences(prefer: str) -> str:
    """A `Prefer` value without `respond-async` (the target is asked the rest)."""
    kept = [p.strip() for p in prefer.split(",")]
    return ", ".join(p for p in kept if p and not prefers_async(p))


class AsyncAccept:
    """Stores granted `Prefer: respond-async` requests and answers them 202."""

    def __init__(self, settings: Settings, deliveries: Deliveries) -> None:
        self.settings = settings
        self.deliveries = deliveries
        # The request to store, by held flow (a flow cut off before its body is complete
        # is forgotten with it).
        self._held: WeakKeyDictionary[http.HTTPFlow, Held] = WeakKeyDictionary()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.DESTINATION not in flow.metadata:
            return
        request = flow.request
        if not prefers_async(fields.get(request.headers, b"prefer")):
            return
        if delivery.attempt_of(flow) is not None:
            return  # never stored twice (delivery leaves `respond-async` out anyway)
        if problem.FORWARD in flow.metadata:
            return  # forward mode answers in place: a 202's Location would be the target's
        if fields.get(request.headers, b"upgrade") is not None:
            message = "a protocol upgrade (WebSocket) needs its client: it cannot be async"
            problem.deny(flow, 400, "bad-request", message)
            return
        key = fields.get(request.headers, b"idempotency-key")
        if key is not None and (not _KEY.fullmatch(key) or TOKEN_SHAPE.search(key.encode())):
            message = "an Idempotency-Key is 1 to 255 printable ASCII characters, not a token"
            problem.deny(flow, 400, "bad-request", message)
            return
        if self.deliveries.full(flow.metadata[problem.PROXY]):
            message = "this proxy's async queue is full; try again later"
            problem.deny(flow, 503, "async-queue-full", message, {"retry-after": "30"})
            return
        limit = self.settings.runtime.config.limits.max_async_body_bytes
        length = fields.get(request.headers, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            too_large(flow, limit)
            return
        meta = flow.metadata
        # What will be stored, taken now: the flow is masked next, since mitmweb shows
        # it (and its token) while its body arrives, before it is answered.
        path, headers, key = self._stored_request(flow)
        # Held back: the stages that forward (rewrite, swap, upstream, OAuth2, ...) act
        # only on a flow with a destination and a target, and this one goes nowhere now.
        del meta[problem.DESTINATION]
        self._held[flow] = Held(meta.pop(problem.TARGET), path, headers, key)
        meta[HELD] = limit
        request.stream = False  # the whole body, to store (bounded: see GatewayStream)
        mask(flow)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow not in self._held or flow.response or flow.error or not flow.live:
            return None
        return self._store(flow)

    async def _store(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        limit = meta.pop(HELD)
        target, path, headers, key = self._held.pop(flow)
        meta[problem.TARGET] = target  # for the row; no stage after this one forwards it
        request = flow.request
        body = request.raw_content or b""
        if len(body) > limit:
            too_large(flow, limit)
            return
        config = self.settings.runtime.config
        proxy_id = meta[problem.PROXY]
        policy = config.proxies[proxy_id].async_
        async_id = new_request_id()
        key = key or f"keyswap-{async_id}"
        now = flow.request.timestamp_start or 0.0
        try:
            await self.deliveries.call(
                async_queue.enqueue,
                id=async_id,
                proxy_id=proxy_id,
                token_id=meta.get(TOKEN_ID),
                token_sha256=meta.get(TOKEN_SHA256),
                client_ip=flow.client_conn.peername[0] if flow.client_conn.peername else None,
                now=iso(now),
                deadline_at=iso(now + policy.max_age_s),
                max_attempts=policy.max_attempts,
                idempotency_key=key,
                accepted_request_id=meta.get(problem.REQUEST_ID, ""),
                method=request.method,
                path=path,
                headers=headers,
                body=body,
            )
        except StateError as e:
            unavailable(flow, e, "the request could not be stored for async delivery")
            return
        self.deliveries.accepted(proxy_id)
        location = RESULTS + async_id
        meta[problem.ASYNC_ID] = async_id
        meta[problem.ASYNC_ATTEMPT] = 0
        body_out = json.dumps({"id": async_id, "state": "queued", "location": location})
        flow.response = http.Response.make(
            202,
            body_out.encode() + b"\n",
            {
                "content-type": "application/json",
                "location": location,
                "preference-applied": "respond-async",
                "cache-control": "no-store",
            },
        )
        meta[problem.ANSWERED] = True
        problem.decide(flow, problem.GRANTED, f"accepted for async delivery to target '{target}'")
        problem.stamp(flow, flow.response)

    def _stored_request(
        self, flow: http.HTTPFlow
    ) -> tuple[str, list[tuple[bytes, bytes]], str | None]:
        """The path as the client sent it without any parameter holding a token (routing
        refuses a token in the path itself), and the headers as the target may see them
        (the proxy's request plan; no proxy credential, nothing shaped like a token),
        without framing."""
        path, _, query = flow.request.path.partition("?")
        query = without_tokens(query)
        runtime = self.settings.runtime
        proxy_id = flow.metadata[problem.PROXY]
        headers = flow.request.headers.copy()
        prefer = other_preferences(fields.get(headers, b"prefer") or "")
        if prefer:  # the target is asked the rest
            fields.put(headers, b"prefer", prefer.encode("utf-8", "surrogateescape"))
        else:
            del headers["prefer"]
        filter_request(runtime.header_plans[proxy_id][0], headers)  # as the target may see them
        place = runtime.token_places.get(proxy_id, NO_PLACES).header  # where its token may be
        dropped = NOT_STORED | ({place} if place is not None else set())
        kept = [(k, v) for k, v in headers.fields if k.lower() not in dropped]
        key = fields.get(flow.request.headers, b"idempotency-key")
        return (f"{path}?{query}" if query else path), kept, key


def unavailable(flow: http.HTTPFlow, e: StateError, what: str) -> None:
    """503: the async queue's database did not answer (the reason goes to the log row)."""
    if flow.live and not flow.response:
        flow.metadata[problem.ERROR] = f"async queue unavailable: {e}"
        message = f"{what}; try again shortly"
        problem.deny(flow, 503, "async-unavailable", message, {"retry-after": "1"})


def too_large(flow: http.HTTPFlow, limit: int) -> None:
    problem.deny(
        flow,
        413,
        "too-large",
        f"an async request body may hold at most {limit} bytes (limits.max_async_body_bytes)",
        {"connection": "close"},
    )
