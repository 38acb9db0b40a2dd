"""Forward (intercepting) mode's front door (docs/forward.md): a program that cannot
change its base URL sets `HTTPS_PROXY` to keyswap's `regular` listener.

The destination is where the client's tunnel goes: the CONNECT authority (and the TLS
server name the client sent in it must be that host), or, for a plain-HTTP proxy
request, its absolute URL. A Host header or absolute URL inside a request that names
another origin is refused, never followed: a client must not be able to open a tunnel
to one address and have the credential of another put on its request.

- A CONNECT to a target's origin (its base URL's, or one in its `allowed_hosts`) opens
  an intercepted tunnel; to a `forward.passthrough` host, a tunnel keyswap never looks
  into (a log row says it was opened); to anything else, it is refused (403).
- In an intercepted request the proxy token stands where the API expects its key (or
  in `Authorization`/`x-proxy-token`); it must be a token of a proxy whose target
  serves the origin. The request then takes the reverse mode's path through every
  stage, as if sent to that proxy's route with the full URL.
- A request (or a CONNECT) that carries one of the config's secrets is refused, to any
  host: the program should never have had it."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from mitmproxy import connection, http
from mitmproxy.net.http.url import parse_authority
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.mode_specs import RegularMode

from keyswap.config.secrets import MASK_BYTES, Redaction, mask_tokens
from keyswap.config.tokens import SHAPE_BYTES as TOKEN_SHAPE
from keyswap.gateway import problem
from keyswap.gateway.runtime import NO_PLACES, Runtime
from keyswap.gateway.stages.auth import (
    CHALLENGE,
    INVALID,
    MISSING,
    TOKEN_ID,
    TOKEN_SHA256,
    owner_of,
    presented_token,
)
from keyswap.gateway.stages.routing import client_path
from keyswap.net import fields
from keyswap.net.urls import hostport, origin_of

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

SECRET = (
    "the request carries one of keyswap's target credentials; send your proxy token "
    "instead, and keyswap puts the credential on"
)


class Tunnel(NamedTuple):
    """Where a client connection's CONNECT went, and whether keyswap looks into it."""

    host: str  # lower case, as the CONNECT named it
    port: int
    passthrough: bool


class ForwardRouter:
    """Decides where a forward-mode request goes, and for which proxy."""

    def __init__(self, settings: Settings, redaction: Callable[[], Redaction]) -> None:
        self.settings = settings
        self.redaction = redaction
        self.tunnels: dict[str, Tunnel] = {}  # client connection id -> its tunnel

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return  # refused by the firewall
        meta, request = flow.metadata, flow.request
        host, port = request.host.lower(), request.port
        meta[problem.PATH] = mask_tokens(hostport(host, port))  # as asked for: host:port
        if self._carries_secret(flow):
            return
        index = self.settings.runtime.forward
        if index.intercepts(host, port):
            tunnel = Tunnel(host, port, passthrough=False)
        elif index.passes_through(host):
            tunnel = Tunnel(host, port, passthrough=True)
        else:
            problem.deny(flow, 403, "not-a-target", _not_a_target(hostport(host, port)))
            return
        opened = self.tunnels.setdefault(flow.client_conn.id, tunnel)
        if opened != tunnel:  # an HTTP/2 client's second CONNECT stream, elsewhere
            message = f"this connection's tunnel goes to {hostport(opened.host, opened.port)}"
            problem.deny(flow, 400, "bad-request", message)
            return
        if tunnel.passthrough:
            meta[problem.PASSTHROUGH] = True
            problem.decide(flow, problem.GRANTED, "tunnelled untouched (forward.passthrough)")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Inside a passthrough tunnel: raw bytes both ways, no TLS interception. Inside
        an intercepted one: TLS or HTTP, never raw bytes past the stages."""
        context = nextlayer.context
        tunnel = self.tunnels.get(context.client.id)
        address = context.server.address
        if tunnel is None or address is None:
            return
        if (address[0].lower(), address[1]) != (tunnel.host, tunnel.port):
            return
        if tunnel.passthrough:
            nextlayer.layer = layers.TCPLayer(context, ignore=True)
        elif isinstance(nextlayer.layer, (layers.TCPLayer, layers.UDPLayer, layers.DNSLayer)):
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay or flow.response or flow.error or not flow.live:
            return  # a replay is refused by the router
        client = flow.client_conn
        if not isinstance(client.proxy_mode, RegularMode):
            return
        request = flow.request
        tunnel = self.tunnels.get(client.id)
        if tunnel is not None:
            scheme, host, port = ("https" if client.tls else "http"), tunnel.host, tunnel.port
        else:  # a plain-HTTP proxy request: its absolute URL
            scheme, host, port = request.scheme, request.host.lower(), request.port
        origin = origin_of(scheme, host, port)
        meta = flow.metadata
        meta[problem.FORWARD] = origin
        path = client_path(flow, origin)
        if path is None:
            return
        if not path.startswith("/"):  # an HTTP/2 :path may be anything: `:8443/x` moves it
            problem.deny(flow, 400, "bad-request", "the request's path must start with '/'")
            return
        upgrade = fields.get(request.headers, b"upgrade")
        if upgrade is not None and upgrade.strip().lower() != "websocket":
            # mitmproxy would hand the connection on as raw bytes after a 101
            problem.deny(flow, 400, "bad-request", "forward mode upgrades to WebSocket only")
            return
        if (named := _named_elsewhere(flow, scheme, host, port)) is not None:
            message = f"{named} names another origin than the connection's, {origin}"
            problem.deny(flow, 403, "host", message)
            return
        if self._carries_secret(flow):
            return
        runtime = self.settings.runtime
        candidates = runtime.forward.proxies_for(origin)
        if not candidates:
            if tunnel is None and runtime.forward.passes_through(host):
                _pass_on(flow)  # plain HTTP: passed on untouched
                return
            problem.deny(flow, 403, "not-a-target", _not_a_target(origin))
            return
        if _authenticate(flow, runtime, candidates, origin):
            meta[problem.REST] = "/" + origin + path  # the full-URL form of reverse mode

    def _carries_secret(self, flow: http.HTTPFlow) -> bool:
        """Refuses a request whose target or header values hold a configured secret (also
        as a `Basic` pair's part), and masks it there: the flow is shown (mitmweb,
        `flow_detail`) and may be saved."""
        redact, data = self.redaction(), flow.request.data
        values = [v for _, v in data.headers.fields]
        seen = b"\n".join([data.path, *values, *(_basic_pair(v) for v in values)])
        if not redact.holds_value(seen):
            return False

        def masked(value: bytes) -> bytes:  # a Basic pair holding one: masked whole
            return (
                MASK_BYTES if redact.holds_value(_basic_pair(value)) else redact.mask_values(value)
            )

        data.path = redact.mask_values(data.path)
        data.headers.fields = tuple((k, masked(v)) for k, v in data.headers.fields)
        problem.deny(flow, 403, "secret-in-request", SECRET)
        return True


def _named_elsewhere(flow: http.HTTPFlow, scheme: str, host: str, port: int) -> str | None:
    """What in the request names an origin other than where it goes (the TLS server
    name, the Host header, the request's authority), or None."""
    client, request = flow.client_conn, flow.request
    if client.tls and client.sni and client.sni.lower() != host:
        return "the TLS server name"
    named = (
        ("the Host header", fields.get(request.headers, b"host")),
        ("the request's authority", request.authority or None),
    )
    for what, value in named:
        if value is None:
            continue
        try:
            named_host, named_port = parse_authority(value, check=True)
        except ValueError:
            return what
        default = 443 if scheme == "https" else 80
        if (named_host.lower(), named_port or default) != (host, port):
            return what
    return None


def _basic_pair(value: bytes) -> bytes:
    """`user:password` of a `Basic` credential, else nothing."""
    scheme, _, encoded = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return b""
    try:
        return base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _pass_on(flow: http.HTTPFlow) -> None:
    """A plain-HTTP request to a passthrough host goes on as it is, unless it carries a
    proxy token: that is never sent anywhere but keyswap."""
    data = flow.request.data
    if TOKEN_SHAPE.search(data.path + b"\n".join(v for _, v in data.headers.fields)):
        message = "a proxy token is never sent to a passthrough host"
        problem.deny(flow, 403, "token-to-passthrough", message)
        return
    flow.metadata[problem.PASSTHROUGH] = True
    problem.decide(flow, problem.GRANTED, "passed on untouched (forward.passthrough)")


def _authenticate(
    flow: http.HTTPFlow, runtime: Runtime, candidates: tuple[str, ...], origin: str
) -> bool:
    """Whether the request carries a token of one of the proxies that serve its origin
    (then the flow says whose, as the auth stage would: that stage leaves forward mode's
    flows to this one, which knows where each candidate's token may stand); else it is
    refused. The token is looked for where each candidate proxy's target expects its
    key."""
    headers, path = flow.request.headers, flow.request.path
    token = None
    for proxy_id in candidates:
        places = runtime.token_places.get(proxy_id, NO_PLACES)
        token = presented_token(headers, path if places.query is not None else "", places)
        if token:
            break
    if not token:
        problem.deny(flow, 401, "missing-token", MISSING, CHALLENGE)
        return False
    owner = owner_of(runtime, token)
    if owner is None:
        problem.deny(flow, 401, "wrong-token", "the token is not a valid proxy token", INVALID)
        return False
    if owner.proxy_id not in candidates:
        message = f"the token's proxy '{owner.proxy_id}' does not serve {origin}"
        problem.deny(flow, 403, "host", message)
        return False
    meta = flow.metadata
    meta[problem.PROXY], meta[TOKEN_ID], meta[TOKEN_SHA256] = owner
    return True


def _not_a_target(where: str) -> str:
    return (
        f"{where} is not a target's origin, nor in forward.passthrough; keyswap's forward "
        "mode reaches only those"
    )
