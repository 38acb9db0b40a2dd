"""TLS to targets with their own `tls:` settings (a private CA, a client certificate,
or verification off) and to https upstream proxies. Other targets use mitmproxy's TLS
settings unchanged."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mitmproxy import connection, tls
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from keyswap.config.model import TargetTls

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

# X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | X509_CHECK_FLAG_NEVER_CHECK_SUBJECT, as mitmproxy.
_HOSTFLAGS = 0x4 | 0x20


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
        if server.address is None:
            return
        target_tls = self._settings_for(server.address)
        if target_tls is None:
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

    def _settings_for(self, address: tuple[str, int]) -> TargetTls | None:
        """The `tls:` block of the target served at this address, when it is not the default."""
        config = self.settings.runtime.config
        for proxy in config.upstream_proxies.values():
            if proxy.type == "https" and (proxy.host, proxy.port) == address:
                return TargetTls(verify=proxy.tls.verify, ca_file=proxy.tls.ca_file)
        default = TargetTls()
        for target in config.targets.values():
            if target.tls != default and _address(target.base_url) == address:
                return target.tls
        return None


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
