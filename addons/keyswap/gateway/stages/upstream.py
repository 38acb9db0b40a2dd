"""Upstream proxies: a target with `upstream_proxy` is reached only through it.

Plain-HTTP targets behind an http proxy are sent in absolute form to the proxy;
everything else (HTTPS targets, or any target behind an https proxy) goes through a
CONNECT tunnel. `Proxy-Authorization: Basic` is added when the proxy has basic auth.
Every granted flow gets a server connection spec of its own, so a connection through
one proxy, another, or direct is never reused for the wrong kind."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from mitmproxy import connection, http

from keyswap.config.model import BasicProxyAuth, UpstreamProxy
from keyswap.gateway import problem
from keyswap.net.urls import hostport

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

UPSTREAM = "keyswap.upstream_proxy"
ABSOLUTE_FORM = "keyswap.absolute_form"


def proxy_authorization(proxy: UpstreamProxy) -> str | None:
    """The `Proxy-Authorization` value for a proxy, or None when it needs no auth."""
    if not isinstance(proxy.auth, BasicProxyAuth):
        return None
    pair = f"{proxy.auth.user}:{proxy.auth.password.get_secret_value()}".encode()
    return "Basic " + base64.b64encode(pair).decode()


class UpstreamProxies:
    """Routes each granted request direct or through its target's upstream proxy."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.TARGET not in flow.metadata:
            return
        config = self.settings.runtime.config
        request = flow.request
        name = config.targets[flow.metadata[problem.TARGET]].upstream_proxy
        if name is None:
            if flow.server_conn.via is not None:  # inherited from an earlier flow
                flow.server_conn = connection.Server(address=(request.host, request.port))
            return
        proxy = config.upstream_proxies[name]
        flow.metadata[UPSTREAM] = name
        if request.scheme == "http" and proxy.type == "http":
            # Absolute form to the proxy itself: GET http://target/path HTTP/1.1
            target = hostport(request.host, request.port)
            request.data.host, request.data.port = proxy.host, proxy.port
            request.authority = request.host_header = target
            if auth := proxy_authorization(proxy):
                request.headers["proxy-authorization"] = auth
            flow.metadata[ABSOLUTE_FORM] = True
            if flow.server_conn.via is not None:
                flow.server_conn = connection.Server(address=(proxy.host, proxy.port))
        else:
            flow.server_conn = connection.Server(
                address=(request.host, request.port), via=(proxy.type, (proxy.host, proxy.port))
            )

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Authenticate the CONNECT that opens a tunnel through an upstream proxy."""
        address = flow.server_conn.address
        for proxy in self.settings.runtime.config.upstream_proxies.values():
            if (proxy.host, proxy.port) == address:
                if auth := proxy_authorization(proxy):
                    flow.request.headers["proxy-authorization"] = auth
                return

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A 407 to an absolute-form request comes from the proxy, not the target.
        if flow.metadata.get(ABSOLUTE_FORM) and flow.response and flow.response.status_code == 407:
            flow.response.stream = False

    def response(self, flow: http.HTTPFlow) -> None:
        refused = flow.response is not None and flow.response.status_code == 407
        if flow.metadata.get(ABSOLUTE_FORM) and refused:
            flow.response = problem.make(
                flow,
                502,
                "upstream-proxy",
                f"upstream proxy '{flow.metadata[UPSTREAM]}' refused authentication (407)",
            )
            flow.metadata[problem.ERROR] = "407 Proxy Authentication Required"
