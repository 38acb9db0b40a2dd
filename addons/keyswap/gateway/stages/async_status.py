"""`GET /_keyswap/requests/<id>`: an async request's state and, once done, the
target's answer, for a token of the proxy that accepted it. Any other token, and any
unknown id, gets the same 404: an id of another proxy is not even confirmed to exist."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap.gateway import problem
from keyswap.gateway.stages.async_accept import RESULTS, unavailable
from keyswap.gateway.stages.auth import (
    CHALLENGE,
    INVALID,
    MISSING,
    TOKEN_ID,
    owner_of,
    presented_token,
)
from keyswap.state import async_queue
from keyswap.state.backends import StateError

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings
    from keyswap.gateway.stages.deliveries import Deliveries

_ID = re.compile(r"[0-9a-f]{26}")
NOT_FOUND = "no async request with this id for this proxy"


class AsyncStatus:
    """Answers the async results endpoint."""

    def __init__(self, settings: Settings, deliveries: Deliveries) -> None:
        self.settings = settings
        self.deliveries = deliveries

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live or not flow.metadata.get(problem.RESERVED):
            return None
        path = flow.request.path.partition("?")[0]
        if not path.startswith(RESULTS):
            return None
        if flow.request.method not in ("GET", "HEAD"):
            message = "async results are read with GET"
            problem.deny(flow, 405, "method", message, {"allow": "GET, HEAD"})
            return None
        token = presented_token(flow.request.headers)
        if not token:
            problem.deny(flow, 401, "missing-token", MISSING, CHALLENGE)
            return None
        owner = owner_of(self.settings.runtime, token)
        if owner is None:
            message = "the token is not valid for any proxy"
            problem.deny(flow, 401, "wrong-token", message, INVALID)
            return None
        flow.metadata[problem.PROXY], flow.metadata[TOKEN_ID] = owner.proxy_id, owner.token_id
        if not self.settings.runtime.config.proxies[owner.proxy_id].active:
            problem.deny(flow, 403, "inactive", f"proxy '{owner.proxy_id}' is disabled")
            return None
        async_id = path[len(RESULTS) :]
        if not _ID.fullmatch(async_id):
            problem.deny(flow, 404, "unknown-async-request", NOT_FOUND)
            return None
        return self._answer(flow, async_id, owner.proxy_id)

    async def _answer(self, flow: http.HTTPFlow, async_id: str, proxy_id: str) -> None:
        try:
            row = await self.deliveries.call(async_queue.get, async_id, proxy_id)
        except StateError as e:
            unavailable(flow, e, "async results cannot be read now")
            return
        if not flow.live or flow.response:
            return
        if row is None:
            problem.deny(flow, 404, "unknown-async-request", NOT_FOUND)
            return
        result = async_queue.public(row)
        flow.response = http.Response.make(
            200,
            json.dumps(result, indent=2).encode() + b"\n",
            {"content-type": "application/json", "cache-control": "no-store"},
        )
        flow.metadata[problem.ANSWERED] = True
        problem.decide(flow, problem.GRANTED, f"async request {async_id}: {result['state']}")
        problem.stamp(flow, flow.response)
