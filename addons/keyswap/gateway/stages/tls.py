"""TLS to targets with their own `tls:` settings (a private CA, a client certificate,
or verification off) and to https upstream proxies with theirs. The settings come from
the key of the connection (the target it was made for, see upstream.py), never from its
address: two targets at one address keep their own. Connections with the default
settings, and any keyswap did not make, use mitmproxy's TLS settings unchanged."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import TYPE_CHECKING

from mitmproxy import connection, tls
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from keyswap.config.model import TargetTls
from keyswap.gateway.stages.upstream import KeyedAddress

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

# X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | X509_CHECK_FLAG_NEVER_CHECK_SUBJECT, as mitmproxy.
_HOSTFLAGS = 0x4 | 0x20
_DEFAULT = TargetTls()


@lru_cache(maxsize=64)
def client_context(settings: TargetTls) -> SSL.Context:
    """An SSL context for connections to a target (cached per distinct tls: block)."""
    return net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD,
        min_version=net_tls.Version.TLS1_2,
        max_version=net_tls.Version.UNBOUNDED,
        cipher_list=None,
        ecdh_curve=None,
        verify=net_tls.Verify.VERIFY_PEER if settings.verify else net_tls.Verify.VERIFY_NONE,
        ca_path=None,
        ca_pemfile=settings.ca_file,
        client_cert=settings.client_cert,
        legacy_server_connect=False,
    )


class TlsToTargets:
    """Provides the TLS connection to targets whose config says how to verify them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        if tls_start.ssl_conn is not None or not isinstance(tls_start.conn, connection.Server):
            return
        server = tls_start.conn
        target_tls = settings_for(server)
        if target_tls is None or server.address is None:
            return
        ssl_conn = SSL.Connection(client_context(target_tls))
        name = server.sni or server.address[0]
        param = SSL._lib.SSL_get0_param(ssl_conn._ssl)  # type: ignore[attr-defined]
        SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, _HOSTFLAGS)  # type: ignore[attr-defined]
        try:
            ip = ipaddress.ip_address(name).packed
        except ValueError:
            host = name.encode("idna")
            ssl_conn.set_tlsext_host_name(host)
            ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, host, len(host))  # type: ignore[attr-defined]
        else:
            ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))  # type: ignore[attr-defined]
        if ok != 1:
            raise ValueError(f"cannot verify the name {name}")
        server.alpn_offers = [b"http/1.1"]
        ssl_conn.set_alpn_protos([b"http/1.1"])
        ssl_conn.set_connect_state()
        tls_start.ssl_conn = ssl_conn


def settings_for(server: connection.Server) -> TargetTls | None:
    """The `tls:` settings of the target (or https upstream proxy) this connection was
    made for, when they are not the defaults."""
    address = server.address
    if not isinstance(address, KeyedAddress):
        return None  # not made for a target: mitmproxy's settings
    key = address.key
    settings: TargetTls | None
    if address.to_proxy:
        if key.proxy is None:
            return None
        settings = TargetTls(verify=key.proxy.tls.verify, ca_file=key.proxy.tls.ca_file)
    else:
        settings = key.tls
    return None if settings is None or settings == _DEFAULT else settings
