"""Target failures become problem responses: 502 when the target cannot be reached or
breaks off, 504 when it is too slow. Their message names the target and upstream proxy
by their config names and the kind of failure; mitmproxy's text, which names addresses,
goes to the activity log only. Adds the connect timeout mitmproxy lacks and the
target's `timeout_s` for its response.

mitmproxy answers a failed upstream with its own HTML page and no hook can replace it,
so keyswap installs a subclass of mitmproxy's HttpStream whose protocol-error handler
sends the gateway's response instead, while nothing has reached the client yet. The
same subclass asks for server connections by key (see upstream.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from mitmproxy import connection, ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestHeaders,
    RequestProtocolError,
    ResponseProtocolError,
)

from keyswap.config.secrets import mask_tokens
from keyswap.gateway import delivery, problem, wire
from keyswap.gateway.stages.async_accept import HELD, too_large
from keyswap.gateway.stages.upstream import (
    PROXY_ANSWER,
    UPSTREAM,
    KeyedAddress,
    connect_address,
    connection_request,
    forward_failed,
)

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

logger = logging.getLogger(__name__)

TIMED_OUT = "keyswap.timed_out"
# A refused request's body is read (and dropped) up to this size, so that the connection
# stays open for the next request; past it, the answer is sent and the connection closed.
DISCARD_AFTER = 64 * 1024
# Response deadlines are checked this often: one timer for all flows instead of one
# timer per request (an asyncio timer costs the loop more than the check).
SWEEP_INTERVAL_S = 0.1
Address = tuple[str, int]


def failure_response(flow: http.HTTPFlow, error: str) -> http.Response | None:
    """The gateway's answer to a failed forward, or None for flows it did not grant.
    `error` (mitmproxy's text, which names addresses) goes to the activity log's `error`
    column only; the client is told the kind of failure (see `describe`)."""
    meta = flow.metadata
    if meta.get(problem.TARGET) is None:
        return None
    if phrase := meta.get(PROXY_ANSWER):
        # The upstream proxy's own answer broke off: still the proxy's failure.
        meta[problem.ERROR] = f"{meta.get(problem.ERROR)}; then: {error}"
        return forward_failed(flow, 502, "upstream-proxy", f"failed: {phrase}")
    if meta.get(problem.ANSWERED):
        return None
    meta[problem.ERROR] = error
    if meta.get(TIMED_OUT):
        return forward_failed(flow, 504, "timeout", "did not answer in time")
    what, step = describe(error)
    if meta.get(UPSTREAM) and step == CONNECT:
        # Every connection the gateway makes for such a target goes to the proxy.
        return forward_failed(
            flow, 502, "upstream-proxy", f"failed: upstream proxy unreachable ({what})"
        )
    reason = "upstream-proxy" if meta.get(UPSTREAM) and step == PROXY else "unreachable"
    return forward_failed(flow, 502, reason, f"failed: {what}")


# The step that failed: opening the TCP connection (to the target, or to the upstream
# proxy when there is one), the proxy's CONNECT, or talking to the target.
CONNECT, PROXY, TARGET = "connect", "proxy", "target"

# What went wrong, in words safe to show a client. mitmproxy's error text names the
# addresses it tried ("Connect call failed ('10.0.0.7', 443)", "Upstream proxy
# 10.0.0.9:3128 refused ..."), so none of it is passed on but the pieces matched here:
# status codes and OpenSSL's fixed reasons. Each entry: pattern, phrase (may use the
# pattern's one group), step. First match wins.
_KINDS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), phrase, step)
    for pattern, phrase, step in (
        (
            r"refused HTTP CONNECT request: (\d{3})\b",
            "upstream proxy refused the tunnel (CONNECT answered {})",
            PROXY,
        ),
        (r"^Error connecting to ", "upstream proxy gave an invalid answer to CONNECT", PROXY),
        (
            r"Certificate verify failed: ([a-z0-9 .-]{1,80})",
            "TLS: certificate not trusted ({})",
            TARGET,
        ),
        (r"alert unknown ca|bad certificate", "TLS: the client certificate was refused", TARGET),
        (r"does not speak TLS", "TLS: the server does not speak TLS", TARGET),
        (r"agree on a TLS version", "TLS: no TLS version in common", TARGET),
        (r"OpenSSL|\bTLS\b|\bSSL\b", "TLS handshake failed", TARGET),
        (r"Connect call failed|Connection refused|Errno 111\b", "connection refused", CONNECT),
        (
            r"not known|name resolution|nodename nor servname|No address associated"
            r"|getaddrinfo|Errno -[235]\b",
            "host name not found (DNS)",
            CONNECT,
        ),
        (
            r"Network is unreachable|No route to host|Errno 10[13]\b|Errno 113\b",
            "network unreachable",
            CONNECT,
        ),
        (r"timed out|Errno 110\b", "connection timed out", CONNECT),
        (
            r"closed connection|Connection reset|Broken pipe|\bEOF\b|disconnected",
            "connection closed before the response was complete",
            TARGET,
        ),
        (r"Cannot parse HTTP response|unexpected server response", "invalid HTTP response", TARGET),
    )
)


def describe(error: str) -> tuple[str, str]:
    """The kind of a connection failure in words safe to show a client (no address, no
    raw text), and the step that failed (CONNECT, PROXY or TARGET)."""
    for pattern, phrase, step in _KINDS:
        if m := pattern.search(error):
            return phrase.format(*(g.strip() for g in m.groups())), step
    return "connection failed", TARGET


class GatewayStream(http_layers.HttpStream):
    """mitmproxy's HttpStream, asking for the server connection of the flow's key (see
    upstream.py), writing the request head with the flow's secrets on it (see wire.py),
    and answering upstream failures with `failure_response`."""

    # The two places where mitmproxy sends a request head to the server (streamed, or
    # once the body is in): their commands pass through `_with_secrets`.
    def start_request_stream(self) -> Generator[Any, Any, None]:
        return _with_secrets(self, super().start_request_stream())

    def state_consume_request_body(self, event: Any) -> Generator[Any, Any, None]:
        return _with_secrets(self, super().state_consume_request_body(event))

    def check_body_size(self, request: bool) -> Generator[Any, Any, bool]:
        # mitmproxy reads a request's whole body before it answers, into memory. Two
        # bodies are cut off instead, answered at once, the connection then closed: one
        # whose request is refused already (past what a keep-alive is worth), and a
        # respond-async body past its bound (413).
        flow: http.HTTPFlow | None = getattr(self, "flow", None)
        if not request or flow is None or not self.request_body_buf:
            return (yield from super().check_body_size(request))
        bound = flow.metadata.get(HELD)
        if bound is not None and len(self.request_body_buf) > bound:
            del flow.metadata[HELD]
            too_large(flow, bound)
        elif not (flow.response is not None and len(self.request_body_buf) > DISCARD_AFTER):
            return (yield from super().check_body_size(request))
        self.request_body_buf.clear()
        self.client_state = self.state_errored
        yield from self.send_response()
        return True

    def make_server_connection(self) -> Generator[Any, Any, bool]:
        # mitmproxy's, but with a request that matches only connections of the same key:
        # mitmproxy's own would reuse any open connection to the same address and proxy.
        request = connection_request(self.flow)
        if request is None:
            return (yield from super().make_server_connection())
        conn, err = yield request
        if err:
            yield from self.handle_protocol_error(
                ResponseProtocolError(self.stream_id, err, ErrorCode.CONNECT_FAILED)
            )
            return False
        self.context.server = self.flow.server_conn = conn
        return True

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> Generator[Any, Any, None]:
        # mitmproxy quotes the offending bytes in its message, which becomes the flow's
        # error (its dumper prints it, mitmweb shows it, flows keep it): no token in it.
        event.message = mask_tokens(event.message)
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


def _with_secrets(
    stream: GatewayStream, commands: Generator[Any, Any, None]
) -> Generator[Any, Any, None]:
    """The stream's commands (and the replies sent back into them), with each request
    head that goes to the server carrying the flow's secrets: the one place they are put
    on a request, a copy that only the connection sees."""
    try:
        command = next(commands)
        while True:
            if isinstance(command, http_layers.SendHttp) and isinstance(
                command.event, RequestHeaders
            ):
                flow = getattr(stream, "flow", None)
                command.event.request = wire.for_wire(flow, command.event.request)
            reply = yield command
            command = commands.send(reply)
    except StopIteration:
        return


def install_stream_class() -> None:
    """Make mitmproxy's HTTP layer create GatewayStreams (checked, so that a mitmproxy
    whose internals moved fails at start instead of answering failures wrongly)."""
    needed = (
        "start_request_stream",
        "state_consume_request_body",
        "handle_protocol_error",
        "make_server_connection",
        "check_body_size",
        "send_response",
        "state_consume_response_body",
    )
    stream_ok = all(hasattr(http_layers.HttpStream, n) for n in needed)
    fields = {f.name for f in dataclasses.fields(http_layers.GetHttpConnection)}
    request_ok = {"address", "tls", "via", "transport_protocol"} <= fields
    if not (stream_ok and request_ok):
        raise RuntimeError(
            "keyswap needs mitmproxy 12.2 or 12.3: its HttpStream or GetHttpConnection changed"
        )
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
        self._connecting[(flow.client_conn.id, connect_address(flow))] = flow

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
        handler = handler or delivery.handler_of(flow.client_conn.id)  # an async attempt
        if handler is None:
            return
        # The transports of this flow's connection: the connection itself or, through a
        # CONNECT tunnel, the one to the proxy. mitmproxy makes each from the very address
        # object the flow's connection names (upstream.addresses), so identity finds
        # them, and never another connection to the same address.
        server = flow.server_conn
        hops = [server.address, server.via[1] if server.via else None]
        mine = [a for a in hops if isinstance(a, KeyedAddress)]
        for conn in list(handler.transports):
            address = conn.address if isinstance(conn, connection.Server) else None
            if conn is server or any(address is a for a in mine):
                handler.close_connection(conn)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        self._deadlines.pop(flow.id, None)
        key = (flow.client_conn.id, connect_address(flow))
        if self._connecting.get(key) is flow:
            del self._connecting[key]
