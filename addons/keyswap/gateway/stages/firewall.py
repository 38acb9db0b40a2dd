"""The strict firewall: every request's raw bytes are checked before anything else
reads them (like Spring Security's StrictHttpFirewall), so that no later stage, no log
row and no target ever sees a request that a lenient parser could read two ways.

Refused, whatever the route: a method that is not an RFC 9110 token; a request target
with a control character, a space or a DEL, or longer than `limits.max_url_bytes`
(414); a header name that is not a token; a header value with any control character but
HTAB (a bare CR, which some backends take for a line break; a NUL; an obs-fold
continuation, which mitmproxy joins into the value with CR LF); more than
`limits.max_headers` fields or a head larger than `limits.max_header_bytes` (431).

It also holds what a client may keep open: past `limits.max_connections` a new client
connection is closed at once, and `limits.idle_timeout_s` becomes mitmproxy's
`tcp_timeout` (a connection with no byte in either direction for that long is closed;
never less than the longest time a target is allowed to take)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from mitmproxy import connection, ctx, http

from keyswap.config.loader import LoadedConfig
from keyswap.config.model import Limits
from keyswap.gateway import problem
from keyswap.state.store import new_request_id

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

# RFC 9110 5.6.2: token = 1*tchar
TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# What may not stand in a request target: controls, space, DEL (RFC 9112 3.2).
NOT_IN_TARGET = bytes(range(0x21)) + b"\x7f"
# What may not stand in a field value: controls but HTAB, and DEL (RFC 9110 5.5).
NOT_IN_VALUE = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"
# A proxy token in a header name, in any case (names are case-insensitive).
TOKEN_NAME = re.compile(rb"(?i)ks_[a-z0-9_-]{43}")
METHOD_BYTES = 32  # the longest registered method is 17 bytes (VERSION-CONTROL)


class Firewall:
    """Gives every flow its request id, then refuses requests whose bytes are not
    strictly well-formed or exceed the configured limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.open: set[connection.Client] = set()
        settings.on_reload.append(self._reloaded)

    def configure(self, updated: set[str]) -> None:
        if "keyswap_config" in updated and self.settings.runtime.loaded is not None:
            self.apply_limits(self.settings.runtime.loaded)

    def _reloaded(self, loaded: LoadedConfig | None, errors: list[str]) -> None:
        if loaded is not None:
            self.apply_limits(loaded)

    def apply_limits(self, loaded: LoadedConfig) -> None:
        """The limits mitmproxy enforces itself, set from the config."""
        # mitmproxy's timer counts silence on the client and target side alike: a target
        # allowed to take longer than the idle timeout must not be cut by it.
        config = loaded.config
        waits = (t.connect_timeout_s + t.timeout_s for t in config.targets.values())
        idle = math.ceil(max(config.limits.idle_timeout_s, max(waits, default=0) + 1))
        if ctx.options.tcp_timeout != idle:
            ctx.options.update(tcp_timeout=idle)

    def client_connected(self, client: connection.Client) -> None:
        loaded = self.settings.runtime.loaded
        limit = loaded.config.limits.max_connections if loaded else Limits().max_connections
        if len(self.open) >= limit:
            client.error = f"keyswap: more than {limit} open client connections"
            return
        self.open.add(client)

    def client_disconnected(self, client: connection.Client) -> None:
        self.open.discard(client)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata[problem.REQUEST_ID] = new_request_id()
        refusal = self.refusal(flow.request)
        if refusal is not None:
            status, message = refusal
            problem.deny(flow, status, REASONS[status], message)

    # A forward-mode CONNECT is a request of its own, checked the same way.
    http_connect = requestheaders

    def refusal(self, request: http.Request) -> tuple[int, str] | None:
        """Why the request must be refused, as (status, message), or None."""
        limits = self.settings.runtime.config.limits
        data = request.data
        method, target, fields = data.method, data.path, data.headers.fields
        if not method or len(method) > METHOD_BYTES or method.translate(None, TCHAR):
            return 400, "the method is not a valid HTTP method token"
        if len(target) > limits.max_url_bytes:
            return 414, URL_TOO_LONG.format(limits.max_url_bytes)
        if len(target.translate(None, NOT_IN_TARGET)) != len(target):
            return 400, "the request target contains a control character or a space"
        if len(fields) > limits.max_headers:
            return 431, f"the request has more than {limits.max_headers} header fields"
        size = len(method) + len(target) + 12 + sum(len(k) + len(v) + 4 for k, v in fields)
        if size > limits.max_header_bytes:
            return 431, HEAD_TOO_LARGE.format(limits.max_header_bytes)
        names = b"".join(k for k, _ in fields)
        if names.translate(None, TCHAR) or any(not k for k, _ in fields):
            return 400, "a header name is not a valid token"
        if b"ks_" in names.lower() and TOKEN_NAME.search(b"\n".join(k for k, _ in fields)):
            # Names are forwarded and logged as they are: a token must not hide in one.
            return 400, "a header name holds a proxy token; send the token as a value"
        values = b"".join(v for _, v in fields)
        if len(values.translate(None, NOT_IN_VALUE)) != len(values):
            return 400, (
                "a header value contains a control character (CR, LF, NUL, ...) or an "
                "obsolete line folding; send each header on one line"
            )
        return None


REASONS = {400: "bad-request", 414: "uri-too-long", 431: "header-too-large"}
# Also said by the head gate, which checks the same limits while the head arrives.
URL_TOO_LONG = "the request target is longer than {} bytes"
HEAD_TOO_LARGE = "the request head is larger than {} bytes"
