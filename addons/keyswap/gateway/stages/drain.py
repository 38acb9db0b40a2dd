"""A clean shutdown. On SIGTERM or Ctrl-C mitmproxy calls the addons' `done`; this stage
comes before every stage that closes something: it stops the listeners, lets the
requests in flight finish (for up to `keyswap_drain_s` seconds) and only then lets the
other stages close (the recorder flushes every row last). A request that arrives on an
open keep-alive connection meanwhile is answered 503 and the connection closed, so
clients retry on another gateway instead of waiting on this one."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from keyswap.gateway import problem

logger = logging.getLogger(__name__)

# After the last response hook, the time its final bytes get to leave.
SEND_GRACE_S = 0.2


class Drain:
    """Tracks the requests in flight; on shutdown, waits for them."""

    def __init__(self) -> None:
        self.in_flight: set[http.HTTPFlow] = set()
        self.draining = False

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "keyswap_drain_s",
            float,
            10.0,
            "On shutdown, how long requests in flight get to finish before they are cut.",
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining and flow.response is None and not flow.error:
            problem.deny(
                flow,
                503,
                "shutting-down",
                "this gateway is shutting down; retry the request",
                {"connection": "close", "retry-after": "1"},
            )
        self.in_flight.add(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow)

    async def done(self) -> None:
        self.draining = True
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        if proxyserver is not None:
            await proxyserver.servers.update([])  # stop accepting; open connections stay
        if not self.in_flight:
            return
        deadline = time.monotonic() + ctx.options.keyswap_drain_s
        logger.info("keyswap: shutting down, %d requests in flight", len(self.in_flight))
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning(
                "keyswap: %d requests still in flight after %.0f s; cutting them",
                len(self.in_flight),
                ctx.options.keyswap_drain_s,
            )
        else:
            await asyncio.sleep(SEND_GRACE_S)
