"""The head gate: limits that must hold while a request head is still arriving, before
mitmproxy's parser has buffered it all. mitmproxy reads a request head whole, however
large and however slowly it comes; so between its reverse-proxy layer and its HTTP
layer keyswap puts a layer that reads the client's bytes as they arrive and follows
HTTP/1.1 framing (Content-Length, chunked) to know where each head starts:

- a head larger than `limits.max_header_bytes` (431), or a request line longer than
  `limits.max_url_bytes` (414), is refused as soon as it crosses the limit, so no more
  than that is ever held for one client;
- a head that has not fully arrived `limits.header_timeout_s` after its first byte is
  refused (408): a client that trickles its head never holds a connection for long.

The refusal is a problem+json answer with the keyswap-* headers; the connection is then
closed, and the request gets its activity log row like any other. Everything else (and
everything after a protocol switch, or framing the gate does not follow) passes to
mitmproxy untouched, and the firewall stage checks the parsed head."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers, mode_specs
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode

from keyswap.config.model import Limits
from keyswap.gateway import problem
from keyswap.net.text import shown
from keyswap.state.store import new_request_id

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

Record = Callable[[http.HTTPFlow], None]

HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, PASS = range(7)
LINE_LIMIT = 4096  # a chunk-size line or a trailer line; longer is not HTTP/1.1 framing
LINGER_S = 2.0  # after a refusal, how long the client's remaining bytes are read and dropped
REQUEST_LINE_EXTRA = 64  # the method, spaces and version around the request target


class HeadGate:
    """Puts a `HeadLimiter` under every plain-HTTP reverse-proxy connection."""

    def __init__(self, settings: Settings, record: Record) -> None:
        self.settings = settings
        self.record = record

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if nextlayer.layer is not None or len(context.layers) != 1:
            return
        mode = context.client.proxy_mode
        if not isinstance(context.layers[0], modes.ReverseProxy):
            return
        if not isinstance(mode, mode_specs.ReverseMode) or mode.scheme != "http":
            return
        if starts_like_tls_record(nextlayer.data_client()):
            return
        loaded = self.settings.runtime.loaded
        limits = loaded.config.limits if loaded else Limits()
        nextlayer.layer = HeadLimiter(context, limits, self.record)


class HeadLimiter(layer.Layer):
    """Reads the client's bytes on their way to mitmproxy's HTTP layer (its child)."""

    def __init__(self, context: Any, limits: Limits, record: Record) -> None:
        super().__init__(context)
        self.child_layer = layers.HttpLayer(context, HTTPMode.transparent)
        self.limits = limits
        self.record = record
        self.state = HEAD
        self.head = bytearray()  # the head arriving now (never more than the limit)
        self.line = bytearray()  # a chunk-size or trailer line arriving now
        self.remaining = 0  # bytes left of a body or a chunk
        self.timer: commands.RequestWakeup | None = None  # the one for the head arriving now
        self.timers: dict[int, commands.RequestWakeup] = {}  # every wakeup asked for
        self.refused = False
        self.linger: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        raise AssertionError("handle_event is overridden")  # pragma: no cover

    def handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        # Transparent to mitmproxy's pausing: the child handles its own blocking commands.
        client = self.context.client
        if isinstance(event, events.Wakeup) and id(event.command) in self.timers:
            del self.timers[id(event.command)]
            if event.command is self.linger:
                yield commands.CloseConnection(client)
            elif event.command is self.timer and self.state == HEAD and self.head:
                self.timer = None
                limit = self.limits.header_timeout_s
                yield from self.refuse(408, "timeout", f"the request head took over {limit:g} s")
            return  # one of the gate's own wakeups: not the child's business
        if isinstance(event, events.DataReceived) and event.connection is client:
            if self.refused:
                return
            data, refusal = self.scan(event.data)
            if refusal is not None:
                yield from self.refuse(*refusal)
                return
            if data is not event.data:
                event = events.DataReceived(client, data)
            if self.state == HEAD and self.head and self.timer is None:
                self.timer = commands.RequestWakeup(self.limits.header_timeout_s)
                self.timers[id(self.timer)] = self.timer
                yield self.timer
        yield from self.child_layer.handle_event(event)

    # --- framing ------------------------------------------------------------------

    def scan(self, data: bytes) -> tuple[bytes, tuple[int, str, str] | None]:
        """Follow the client's bytes: what to pass on to mitmproxy, and a refusal
        (status, reason, message) when a head crosses a limit. A chunked body's trailer
        fields are dropped (RFC 9110 6.5.1 lets a recipient discard them): mitmproxy's
        HTTP/1 reader cannot take them, and no API keyswap fronts reads them."""
        pos = 0
        out: list[bytes] = []
        while pos < len(data) and self.state != PASS:
            start, state = pos, self.state
            if state == HEAD:
                pos, refusal = self._head(data, pos)
                if refusal is not None:
                    return b"", refusal
            elif state in (BODY, CHUNK_DATA):
                taken = min(self.remaining, len(data) - pos)
                self.remaining -= taken
                pos += taken
                if self.remaining == 0:
                    self.state = HEAD if state == BODY else CHUNK_END
            else:
                pos = self._chunked(data, pos)
            if state != TRAILERS:
                out.append(data[start:pos])
            elif self.state != TRAILERS:  # the empty line that ends the message
                out.append(b"\r\n")
        out.append(data[pos:])
        return b"".join(out), None

    def _head(self, data: bytes, pos: int) -> tuple[int, tuple[int, str, str] | None]:
        before = len(self.head)
        # Never hold more than the limit (and one byte, to know it was crossed).
        piece = data[pos : pos + self.limits.max_header_bytes - before + 1]
        self.head += piece
        end = self.head.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0:
            if len(self.head) > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                return len(data), (
                    431,
                    "header-too-large",
                    f"the request head is larger than {limit} bytes",
                )
            url_limit = self.limits.max_url_bytes
            if len(self.head) > url_limit + REQUEST_LINE_EXTRA and b"\r\n" not in self.head:
                return len(data), (
                    414,
                    "uri-too-long",
                    f"the request target is longer than {url_limit} bytes",
                )
            return len(data), None
        head = bytes(self.head[: end + 4])
        self.head = bytearray()
        self.timer = None  # the head arrived in time; its wakeup is ignored
        self.state, self.remaining = _framing(head)
        return pos + end + 4 - before, None

    def _chunked(self, data: bytes, pos: int) -> int:
        """Chunk-size lines, the CRLF after each chunk, and the trailer section."""
        end = data.find(b"\n", pos)
        piece = data[pos : end + 1 if end >= 0 else len(data)]
        self.line += piece
        if len(self.line) > LINE_LIMIT:
            self.state = PASS  # not framing the gate follows: mitmproxy will refuse it
            return len(data)
        if end < 0:
            return len(data)
        line = bytes(self.line).rstrip(b"\r\n")
        self.line = bytearray()
        if self.state == CHUNK_END:
            self.state = CHUNK_SIZE if not line else PASS
        elif self.state == CHUNK_SIZE:
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                self.state = PASS
            else:
                self.state, self.remaining = (TRAILERS, 0) if size == 0 else (CHUNK_DATA, size)
        elif not line:  # TRAILERS: an empty line ends the message
            self.state = HEAD
        return end + 1

    # --- refusing -----------------------------------------------------------------

    def refuse(
        self, status: int, reason: str, message: str
    ) -> Generator[commands.Command, Any, None]:
        """Answer from the gate itself, log the request, and close the connection."""
        self.refused = True
        flow = http.HTTPFlow(self.context.client, self.context.server)
        method, path = _request_line(bytes(self.head))
        flow.request = http.Request(
            "", 0, method, b"http", b"", path, b"HTTP/1.1", http.Headers(), None, None, 0, 0
        )
        flow.request.timestamp_start = flow.request.timestamp_end = time.time()
        flow.metadata[problem.REQUEST_ID] = new_request_id()
        flow.metadata[problem.PATH] = shown(path, 1024)
        flow.response = problem.make(flow, status, reason, message, {"connection": "close"})
        flow.response.timestamp_start = flow.response.timestamp_end = time.time()
        self.head = bytearray()
        self.record(flow)
        client = self.context.client
        yield commands.SendData(client, assemble_response(flow.response))
        # A lingering close, as nginx does: stop writing, but read (and drop) what the
        # client is still sending for a moment, so that it reads the answer instead of
        # a connection reset.
        yield commands.CloseTcpConnection(client, half_close=True)
        self.linger = commands.RequestWakeup(LINGER_S)
        self.timers[id(self.linger)] = self.linger
        yield self.linger


def _framing(head: bytes) -> tuple[int, int]:
    """What follows a request head: (state, bytes of body)."""
    lower = head.lower()
    plain = not lower.startswith(b"connect ") and b"\r\nupgrade:" not in lower
    if plain and b"\r\ntransfer-encoding:" not in lower:  # the usual case, in a few finds
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            return HEAD, 0
        if lower.find(b"\r\ncontent-length:", at + 1) < 0:
            value = lower[at + 17 : lower.find(b"\r\n", at + 17)].strip()
            if value.isdigit():
                return (BODY, int(value)) if int(value) else (HEAD, 0)
    lines = head.split(b"\r\n")
    method = lines[0].split(b" ", 1)[0].upper()
    values: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            values.setdefault(name.strip().lower(), []).append(value.strip().lower())
    if method == b"CONNECT" or b"upgrade" in values:
        return PASS, 0  # the connection may switch protocols
    if b"transfer-encoding" in values:
        codings = b",".join(values[b"transfer-encoding"]).split(b",")
        return (CHUNK_SIZE, 0) if codings[-1].strip() == b"chunked" else (PASS, 0)
    lengths = set(values.get(b"content-length", []))
    if not lengths:
        return HEAD, 0
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        return PASS, 0  # ambiguous framing: mitmproxy refuses it and closes
    length = int(next(iter(lengths)))
    return (BODY, length) if length else (HEAD, 0)


def _request_line(head: bytes) -> tuple[bytes, bytes]:
    """The method and target of a (possibly cut) request head, for the log row."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    method = parts[0][:32] if parts and parts[0] else b"-"
    path = parts[1][:1024] if len(parts) > 1 else b""
    return method, path
