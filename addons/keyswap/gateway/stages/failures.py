"""Target failures become problem responses: 502 when the target cannot be reached or
breaks off, 504 when it is too slow. Adds the connect timeout mitmproxy lacks and the
target's `timeout_s` for its response.

mitmproxy answers a failed upstream with its own HTML page and no hook can replace it,
so keyswap installs a subclass of mitmproxy's HttpStream whose protocol-error handler
sends the gateway's response instead, while nothing has reached the client yet."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._events import RequestProtocolError, ResponseProtocolError

from keyswap.gateway import problem
from keyswap.gateway.stages.upstream import UPSTREAM

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

logger = logging.getLogger(__name__)

TIMED_OUT = "keyswap.timed_out"
# Response deadlines are checked this often: one timer for all flows instead of one
# timer per request (an asyncio timer costs the loop more than the check).
SWEEP_INTERVAL_S = 0.1
Address = tuple[str, int]


def failure_response(flow: http.HTTPFlow, error: str) -> http.Response | None:
    """The gateway's answer to a failed forward, or None for flows it did not grant."""
    target = flow.metadata.get(problem.TARGET)
    if target is None or flow.metadata.get(problem.ANSWERED):
        return None
    flow.metadata[problem.ERROR] = error
    upstream = flow.metadata.get(UPSTREAM)
    via = f" via upstream proxy '{upstream}'" if upstream else ""
    if flow.metadata.get(TIMED_OUT):
        return problem.make(flow, 504, "timeout", f"target '{target}'{via} did not answer in time")
    reason = "upstream-proxy" if upstream and _proxy_step(error) else "unreachable"
    return problem.make(flow, 502, reason, f"target '{target}'{via} failed: {error}")


def _proxy_step(error: str) -> bool:
    """Whether mitmproxy's error is about the upstream proxy rather than the target."""
    return "CONNECT" in error or "Upstream proxy" in error or "Connect call failed" in error


class GatewayStream(http_layers.HttpStream):
    """mitmproxy's HttpStream, answering upstream failures with `failure_response`."""

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> Generator[Any, Any, None]:
        flow = getattr(self, "flow", None)
        not_sent = self.server_state in (
            self.state_uninitialized,
            self.state_wait_for_response_headers,
            self.state_consume_response_body,
        )
        answer = None
        if flow is not None and isinstance(event, ResponseProtocolError) and not_sent:
            answer = failure_response(flow, event.message)
        if flow is None or answer is None or self.client_state == self.state_errored:
            yield from super().handle_protocol_error(event)
            return
        flow.response = answer
        self.response_body_buf.clear()
        yield from self.send_response()


def install_stream_class() -> None:
    """Make mitmproxy's HTTP layer create GatewayStreams (checked, so that a mitmproxy
    whose internals moved fails at start instead of answering failures wrongly)."""
    needed = ("handle_protocol_error", "send_response", "state_consume_response_body")
    if not all(hasattr(http_layers.HttpStream, n) for n in needed):
        raise RuntimeError("keyswap needs mitmproxy 12.2.x: its HttpStream has changed")
    if not issubclass(http_layers.HttpStream, GatewayStream):
        http_layers.HttpStream = GatewayStream  # type: ignore[misc]


class Failures:
    """Timeouts and failure answers for granted requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The flow about to open a connection, by (client connection, address).
        self._connecting: dict[tuple[str, Address], http.HTTPFlow] = {}
        self._connect_timers: dict[str, asyncio.TimerHandle] = {}
        # Granted requests awaiting their response: flow id -> (deadline, flow).
        self._deadlines: dict[str, tuple[float, http.HTTPFlow]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        install_stream_class()

    def running(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Time out every flow whose deadline has passed."""
        expired = [flow for deadline, flow in self._deadlines.values() if deadline <= now]
        for flow in expired:
            del self._deadlines[flow.id]
            try:
                self._response_timed_out(flow)
            except Exception:
                # Not the URL: after the swap it may carry a query credential.
                target = flow.metadata.get(problem.TARGET)
                logger.exception("keyswap: timing out a request to target '%s' failed", target)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.TARGET not in flow.metadata:
            return
        self._connecting[(flow.client_conn.id, _connect_address(flow))] = flow

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is None:
            return
        flow = self._connecting.get((data.client.id, data.server.address))
        task = asyncio.current_task()
        if flow is None or task is None:
            return
        target = self.settings.runtime.config.targets.get(flow.metadata[problem.TARGET])
        timeout = target.connect_timeout_s if target else 10.0
        # This hook runs inside the task that opens the connection: cancelling that task
        # is mitmproxy's own path for a failed connect.
        loop = asyncio.get_running_loop()
        self._connect_timers[data.server.id] = loop.call_later(
            timeout, self._connect_timed_out, task, data.server, flow
        )

    def _connect_timed_out(self, task: asyncio.Task[Any], server: Any, flow: http.HTTPFlow) -> None:
        self._connect_timers.pop(server.id, None)
        if server.timestamp_tcp_setup is None and not task.done():
            flow.metadata[TIMED_OUT] = True
            task.cancel()

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if timer := self._connect_timers.pop(data.server.id, None):
            timer.cancel()

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.TARGET not in flow.metadata:
            return
        target = self.settings.runtime.config.targets.get(flow.metadata[problem.TARGET])
        timeout = target.timeout_s if target else 30.0
        self._deadlines[flow.id] = (time.monotonic() + timeout, flow)

    def _response_timed_out(self, flow: http.HTTPFlow) -> None:
        flow.metadata[TIMED_OUT] = True
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver else None
        if handler is None:
            return
        # Through a CONNECT tunnel the open transport is the one to the proxy.
        address = _connect_address(flow)
        for conn in list(handler.transports):
            if conn is flow.server_conn or (
                flow.server_conn.via and getattr(conn, "address", None) == address
            ):
                handler.close_connection(conn)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        self._deadlines.pop(flow.id, None)
        key = (flow.client_conn.id, _connect_address(flow))
        if self._connecting.get(key) is flow:
            del self._connecting[key]


def _connect_address(flow: http.HTTPFlow) -> Address:
    """The address the gateway opens a TCP connection to for this flow."""
    via = flow.server_conn.via
    return via[1] if via else (flow.request.host, flow.request.port)
