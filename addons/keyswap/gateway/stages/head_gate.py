"""The head gate: limits that must hold while a request head is still arriving.

mitmproxy's HTTP/1 server reads a request head whole, however large and however slowly
it comes (its source says "FIXME: protect against header size DoS"). keyswap installs a
subclass of it (as failures.py does for the HTTP stream) that watches the receive buffer
while a head is awaited; mitmproxy's own reader stays the one parser of the framing:

- a head larger than `limits.max_header_bytes` (431), or a first line longer than
  `limits.max_url_bytes` (414), is refused as soon as the buffer crosses the limit, so
  no more than that (and one read) is ever held for one client;
- a head not complete `limits.header_timeout_s` after its first byte is refused (408):
  a client that trickles its head never holds a connection for long;
- the trailer fields of a chunked request body are dropped (RFC 9110 6.5.1 lets a
  recipient discard them): mitmproxy's reader raised NotImplementedError on them and
  the client got no answer; no API keyswap fronts reads them.

The refusals are problem+json answers with the keyswap-* headers and an activity log
row; the connection is then closed after a moment of reading and dropping what the
client still sends (a lingering close, as nginx does), so that it reads the answer."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar

import h11
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1

from keyswap.config.loader import LoadedConfig
from keyswap.config.model import Limits
from keyswap.config.secrets import mask_token_bytes
from keyswap.gateway import problem
from keyswap.gateway.stages.firewall import HEAD_TOO_LARGE, REASONS, URL_TOO_LONG
from keyswap.net.text import shown
from keyswap.state.store import new_request_id

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

Record = Callable[[http.HTTPFlow], None]
LINGER_S = 2.0  # after a refusal, how long the client's remaining bytes are read and dropped
REQUEST_LINE_EXTRA = 64  # the method, spaces and version around the request target


class GatewayHttp1Server(_http1.Http1Server):
    """mitmproxy's HTTP/1 server side, with the head limits."""

    limits: ClassVar[Limits] = Limits()  # the config's, set by HeadGate
    record: ClassVar[Record | None] = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.head_timer: commands.RequestWakeup | None = None
        self.linger: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        # Not a generator itself: every other event costs one type check, no extra frame.
        if type(event) is events.Wakeup:  # only the gate asks for wakeups here
            return self._woken(event)
        return super()._handle_event(event)

    def _woken(self, event: events.Wakeup) -> Generator[commands.Command, Any, None]:
        if event.command is self.linger:
            yield commands.CloseConnection(self.conn)
        elif event.command is self.head_timer and self.awaiting_head and self.buf:
            limit = self.limits.header_timeout_s
            yield from self.refuse(408, "timeout", f"the request head took over {limit:g} s")

    def read_headers(self, event: events.ConnectionEvent) -> Generator[commands.Command, Any, None]:
        # mitmproxy calls this for every event while a head is awaited, with what has
        # arrived of it in self.buf.
        yield from super().read_headers(event)
        if not self.awaiting_head:
            self.head_timer = None  # the head arrived (a late wakeup is ignored)
        elif refusal := self.over_limit():
            yield from self.refuse(*refusal)
        elif self.buf and self.head_timer is None:
            self.head_timer = commands.RequestWakeup(self.limits.header_timeout_s)
            yield self.head_timer

    def dropping(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        """The state after a refusal: what the client still sends is dropped."""
        self.buf = ReceiveBuffer()
        if isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)

    @property
    def awaiting_head(self) -> bool:
        return self.state == self.read_headers

    def over_limit(self) -> tuple[int, str, str] | None:
        size = len(self.buf)
        if size > self.limits.max_url_bytes + REQUEST_LINE_EXTRA and not self._has_line_end():
            return 414, REASONS[414], URL_TOO_LONG.format(self.limits.max_url_bytes)
        if size > self.limits.max_header_bytes:
            return 431, REASONS[431], HEAD_TOO_LARGE.format(self.limits.max_header_bytes)
        return None

    def _has_line_end(self) -> bool:
        return b"\n" in bytes(self.buf)

    def read_body(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if not isinstance(self.body_reader, _WithoutTrailers):
            self.body_reader = _WithoutTrailers(self.body_reader)  # type: ignore[assignment]
        yield from super().read_body(event)

    def refuse(
        self, status: int, reason: str, message: str
    ) -> Generator[commands.Command, Any, None]:
        """Answer from the gate, log the request, and close the connection lingeringly."""
        self.state = self.dropping
        # The whole first line, tokens masked before it is cut: a token cut in two is
        # no longer shaped like one, and would be recorded.
        line = mask_token_bytes(bytes(self.buf).split(b"\n", 1)[0].rstrip(b"\r"))
        self.buf = ReceiveBuffer()
        method, _, rest = line.partition(b" ")
        path = rest.rpartition(b" ")[0] or rest
        now = time.time()
        flow = http.HTTPFlow(self.context.client, self.context.server)
        flow.request = http.Request(
            "", 0, method[:32] or b"-", b"http", b"", path[:1024], b"HTTP/1.1",
            http.Headers(), None, None, now, now,
        )  # fmt: skip
        flow.metadata[problem.REQUEST_ID] = new_request_id()
        flow.metadata[problem.PATH] = shown(path[:1024])
        flow.response = problem.make(flow, status, reason, message, {"connection": "close"})
        flow.response.timestamp_start = flow.response.timestamp_end = now
        record = type(self).record
        if record is not None:
            record(flow)
        yield commands.SendData(self.conn, assemble_response(flow.response))
        yield commands.CloseTcpConnection(self.conn, half_close=True)
        self.linger = commands.RequestWakeup(LINGER_S)
        yield self.linger


class HeadGate:
    """Installs GatewayHttp1Server and keeps its limits those of the served config."""

    def __init__(self, settings: Settings, record: Record) -> None:
        self.settings = settings
        settings.on_reload.append(self._reloaded)
        GatewayHttp1Server.record = record

    def load(self, loader: Any) -> None:
        # Checked, so that a mitmproxy whose internals moved fails at start.
        needed = ("_handle_event", "read_headers", "read_body", "state")
        if not all(hasattr(_http1.Http1Server, n) for n in needed):
            raise RuntimeError("keyswap needs mitmproxy 12.2 or 12.3: its Http1Server changed")
        http_layers.Http1Server = GatewayHttp1Server  # type: ignore[attr-defined]

    def configure(self, updated: set[str]) -> None:
        if "keyswap_config" in updated and self.settings.runtime.loaded is not None:
            self._reloaded(self.settings.runtime.loaded, [])

    def _reloaded(self, loaded: LoadedConfig | None, errors: list[str]) -> None:
        if loaded is not None:
            GatewayHttp1Server.limits = loaded.config.limits


class _WithoutTrailers:
    """mitmproxy's body reader (h11's), with the trailer fields of a chunked body left
    out of the end of the message."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __call__(self, buf: ReceiveBuffer) -> Any:
        event = self.reader(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            return h11.EndOfMessage()
        return event

    def read_eof(self) -> Any:
        return self.reader.read_eof()
