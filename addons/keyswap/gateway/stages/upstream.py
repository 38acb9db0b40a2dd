"""Upstream proxies, and which server connection a flow may use.

A target with `upstream_proxy` is reached only through it: plain-HTTP targets behind an
http proxy are sent in absolute form to the proxy; everything else (HTTPS targets, or
any target behind an https proxy) goes through a CONNECT tunnel, with
`Proxy-Authorization: Basic` when the proxy has basic auth.

Every granted flow gets a `ConnectionKey`: the target's address, its own TLS settings
and SNI, and the upstream proxy with its credentials. A server connection is made for
one key and used only for flows whose key is equal (`KeyedConnection`), and the TLS and
CONNECT settings of a connection come from its key, never from a lookup by address. So
a connection made for one target, proxy or credential is never reused for another, and
two upstream proxies at one address with different credentials are simply two keys."""

from __future__ import annotations

import base64
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mitmproxy import connection, http
from mitmproxy.net.server_spec import ServerSpec
from mitmproxy.proxy.layers.http import GetHttpConnection

from keyswap.config.model import BasicProxyAuth, TargetTls, UpstreamProxy
from keyswap.gateway import problem, wire
from keyswap.net.urls import hostport

if TYPE_CHECKING:
    from keyswap.config.model import Config
    from keyswap.gateway.settings import Settings

UPSTREAM = "keyswap.upstream_proxy"
ABSOLUTE_FORM = "keyswap.absolute_form"
# Set when the upstream proxy answered an absolute-form request itself: what it said.
PROXY_ANSWER = "keyswap.proxy_answer"

Address = tuple[str, int]
KEYS_KEPT = 1024  # distinct destinations whose keys are kept (full-URL requests vary)


@dataclass(frozen=True)
class ConnectionKey:
    """Everything that makes one server connection different from another. A connection
    serves only flows with an equal key."""

    address: Address  # the target's host and port
    tls: TargetTls | None  # the target's own `tls:` block; None for plain http
    sni: str | None  # the name sent in the TLS handshake and verified in the certificate
    upstream_proxy: str | None  # the upstream proxy's config name, and how it is reached:
    proxy: UpstreamProxy | None  # type, address, credentials (SecretStr) and TLS to it

    @property
    def absolute_form(self) -> bool:
        """Plain http through an http proxy: each request goes to the proxy in absolute
        form; any other way through a proxy is a CONNECT tunnel."""
        return self.proxy is not None and self.proxy.type == "http" and self.tls is None


def connection_key(config: Config, target_name: str, request: http.Request) -> ConnectionKey:
    """The key of the server connection a request to this target needs: the one place
    that says what makes two connections different."""
    target = config.targets[target_name]
    https = request.scheme == "https"
    name = target.upstream_proxy
    return ConnectionKey(
        address=(request.host, request.port),
        tls=target.tls if https else None,
        sni=request.host if https else None,
        upstream_proxy=name,
        proxy=config.upstream_proxies[name] if name is not None else None,
    )


class KeyedAddress(tuple[str, int]):
    """A `(host, port)` that carries the key of the connection made to it. mitmproxy
    builds a server connection from the address it is asked for (`Server(address=...)`
    in HttpLayer.get_connection, `Server(address=via[1])` for the tunnel to a proxy), so
    the key is on the connection from the moment it exists: the TLS hook, the CONNECT
    hook and the reuse check read it there. It compares and hashes as the plain tuple,
    and mitmproxy saves it as one (without the key)."""

    key: ConnectionKey
    to_proxy: bool  # the hop to the upstream proxy, not to the target

    def __new__(
        cls, host: str, port: int, key: ConnectionKey, to_proxy: bool = False
    ) -> KeyedAddress:
        self = super().__new__(cls, (host, port))
        self.key = key
        self.to_proxy = to_proxy
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (KeyedAddress, (self[0], self[1], self.key, self.to_proxy))


def addresses(key: ConnectionKey) -> tuple[KeyedAddress, ServerSpec | None]:
    """What mitmproxy is asked to connect to for this key: the address, and the
    upstream proxy hop of a CONNECT tunnel (None when there is none). Fresh objects per
    flow: a timed-out flow's transports are found by their identity (failures.py)."""
    target = KeyedAddress(*key.address, key)
    if key.proxy is None:
        return target, None
    proxy = KeyedAddress(key.proxy.host, key.proxy.port, key, to_proxy=True)
    if key.absolute_form:
        return proxy, None
    return target, (key.proxy.type, proxy)


@dataclass(eq=False)  # keeps GetHttpConnection's identity hash: mitmproxy maps replies by it
class KeyedConnection(GetHttpConnection):
    """mitmproxy's request for a server connection that matches only connections made
    for the same key; any other (another target's, another proxy's, another credential's,
    or one keyswap did not make) is never reused for it."""

    key: ConnectionKey | None = None

    @classmethod
    def of(cls, key: ConnectionKey) -> KeyedConnection:
        address, via = addresses(key)
        return cls(address=address, tls=key.tls is not None, via=via, key=key)

    def connection_spec_matches(self, conn: connection.Connection) -> bool:
        return (
            super().connection_spec_matches(conn)
            and isinstance(conn, connection.Server)
            and isinstance(conn.address, KeyedAddress)
            and conn.address.key == self.key
        )


# flow -> the key of the connection it needs, set by the upstream stage. Beside the
# flow rather than on it: a flow's fields are saved and shown, and a key holds the
# proxy's credentials. Dropped with the flow.
_flow_keys: weakref.WeakKeyDictionary[http.HTTPFlow, ConnectionKey] = weakref.WeakKeyDictionary()


def connection_request(flow: http.HTTPFlow) -> KeyedConnection | None:
    """The request for the flow's server connection, when the upstream stage keyed it."""
    key = _flow_keys.get(flow)
    return KeyedConnection.of(key) if key is not None else None


def connect_address(flow: http.HTTPFlow) -> Address:
    """The address the gateway opens a TCP connection to for this flow: its upstream
    proxy's, or the target's."""
    key = _flow_keys.get(flow)
    if key is not None and key.proxy is not None:
        return key.proxy.host, key.proxy.port
    return flow.request.host, flow.request.port


def proxy_authorization(proxy: UpstreamProxy) -> str | None:
    """The `Proxy-Authorization` value for a proxy, or None when it needs no auth."""
    if not isinstance(proxy.auth, BasicProxyAuth):
        return None
    pair = f"{proxy.auth.user}:{proxy.auth.password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(pair).decode()


# --- answers the proxy made itself ---------------------------------------------------

_SQUID_ERROR = re.compile(r"ERR_[A-Z_]{1,40}")
SQUID_ERRORS = {
    "ERR_CONNECT_FAIL": "it could not connect to the target",
    "ERR_DNS_FAIL": "it could not resolve the target's name",
    "ERR_READ_TIMEOUT": "the target did not answer in time",
    "ERR_LIFETIME_EXP": "the target did not answer in time",
    "ERR_READ_ERROR": "the connection to the target broke",
    "ERR_ZERO_SIZE_OBJECT": "the target sent an empty answer",
    "ERR_ACCESS_DENIED": "it does not allow this request",
    "ERR_CACHE_ACCESS_DENIED": "it refused authentication",
}


def proxy_made(response: http.Response) -> bool:
    """Whether a response to an absolute-form request was made by the upstream proxy
    itself rather than forwarded from the target.

    The rule: a 407 (proxy authentication is the proxy's by definition), or a response
    marked `X-Squid-Error` that has passed at most one `Via` hop. Squid marks every
    error page it makes with `X-Squid-Error`; a response it forwards keeps the target's
    headers and gains only `Via` and `X-Cache`, so a target's own 503 stays the target's.
    A target that sits behind a squid of its own could send `X-Squid-Error` too, but its
    answer then reaches us through two Via hops (its squid's and ours). `Via` and
    `Server: squid` alone prove nothing: squid adds Via to what it forwards, and a
    target may run squid. `Proxy-Status` (RFC 9209) is not trusted either, because a
    target's own CDN sets it."""
    if response.status_code == 407:
        return True
    if "x-squid-error" not in response.headers:
        return False
    hops = [h for v in response.headers.get_all("via") for h in v.split(",") if h.strip()]
    return len(hops) <= 1


def proxy_answer(response: http.Response) -> tuple[str, str]:
    """What the proxy's own answer says: (a phrase safe to show a client, the detail
    for the activity log). Neither holds its body, which may name addresses."""
    status = response.status_code
    squid = response.headers.get("x-squid-error", "")
    detail = f"the upstream proxy answered {status} {response.reason}".rstrip()
    if squid:
        detail += f" (X-Squid-Error: {problem.one_line(squid)})"
    if status == 407:
        return "upstream proxy refused authentication (407)", detail
    phrase = f"upstream proxy answered {status} itself"
    if m := _SQUID_ERROR.match(squid):
        meaning = SQUID_ERRORS.get(m.group())
        phrase += f" ({m.group()}: {meaning})" if meaning else f" ({m.group()})"
    return phrase, detail


def forward_failed(flow: http.HTTPFlow, status: int, reason: str, outcome: str) -> http.Response:
    """The problem response for a forward that got no answer from the target. Its
    message names the target and upstream proxy by their config names, then `outcome`
    ("did not answer in time", "failed: connection refused")."""
    target = flow.metadata.get(problem.TARGET)
    upstream = flow.metadata.get(UPSTREAM)
    via = f" via upstream proxy '{upstream}'" if upstream else ""
    return problem.make(flow, status, reason, f"target '{target}'{via} {outcome}")


class UpstreamProxies:
    """Gives each granted request the server connection of its key: direct, or through
    its target's upstream proxy."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The keys made for the config in use, by (target, scheme, host, port): the same
        # key object for every request to a destination, so that comparing two keys
        # mostly compares an object with itself.
        self._keys: dict[tuple[str, str, str, int], ConnectionKey] = {}
        self._keys_for: Config | None = None

    def key(self, flow: http.HTTPFlow) -> ConnectionKey:
        config, request = self.settings.runtime.config, flow.request
        if self._keys_for is not config or len(self._keys) >= KEYS_KEPT:
            self._keys, self._keys_for = {}, config
        where = (flow.metadata[problem.TARGET], request.scheme, request.host, request.port)
        found = self._keys.get(where)
        if found is None:
            found = self._keys[where] = connection_key(config, where[0], request)
        return found

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.TARGET not in flow.metadata:
            return
        request = flow.request
        key = self.key(flow)
        if key.upstream_proxy is not None:
            flow.metadata[UPSTREAM] = key.upstream_proxy
        proxy = key.proxy
        if key.absolute_form and proxy is not None:
            # Absolute form to the proxy itself: GET http://target/path HTTP/1.1
            target = hostport(request.host, request.port)
            request.data.host, request.data.port = proxy.host, proxy.port
            request.authority = request.host_header = target
            if auth := proxy_authorization(proxy):
                wire.put_header(flow, b"proxy-authorization", auth.encode())
            flow.metadata[ABSOLUTE_FORM] = True
        # mitmproxy opens a connection for the key or reuses one made for the same key
        # (see KeyedConnection and GatewayStream.make_server_connection).
        _flow_keys[flow] = key

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Authenticate the CONNECT with the credentials of the proxy the tunnel is for."""
        address = flow.server_conn.address
        proxy = address.key.proxy if isinstance(address, KeyedAddress) else None
        if proxy is not None and (auth := proxy_authorization(proxy)):
            flow.request.headers["proxy-authorization"] = auth

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not flow.metadata.get(ABSOLUTE_FORM) or not proxy_made(response):
            return
        # Not the target's answer: the gateway answers instead (in `response`), so the
        # later stages leave it alone and its body is read, not streamed to the client.
        phrase, detail = proxy_answer(response)
        flow.metadata[PROXY_ANSWER] = phrase
        flow.metadata[problem.ERROR] = detail
        flow.metadata[problem.ANSWERED] = True
        response.stream = False

    def response(self, flow: http.HTTPFlow) -> None:
        phrase = flow.metadata.get(PROXY_ANSWER)
        if phrase is None or flow.response is None:
            return
        status = 504 if flow.response.status_code == 504 else 502
        reason = "timeout" if status == 504 else "upstream-proxy"
        flow.response = forward_failed(flow, status, reason, f"failed: {phrase}")
