from mitmproxy import connection

from keyswap.config.model import TargetTls, UpstreamProxy
from keyswap.gateway.stages.tls import settings_for
from keyswap.gateway.stages.upstream import ConnectionKey, KeyedAddress

ADDRESS = ("api.example.com", 443)


def key(tls: TargetTls, proxy: UpstreamProxy | None = None) -> ConnectionKey:
    return ConnectionKey(ADDRESS, tls, ADDRESS[0], "p" if proxy else None, proxy)


def server(k: ConnectionKey, to_proxy: bool = False) -> connection.Server:
    return connection.Server(address=KeyedAddress(*ADDRESS, k, to_proxy))


def test_settings_come_from_the_connection_s_target_not_its_address() -> None:
    # three connections to one address, each made for a target of its own
    insecure = TargetTls(verify=False)
    pinned = TargetTls(ca_file="/etc/ca.pem")
    assert settings_for(server(key(insecure))) == insecure
    assert settings_for(server(key(pinned))) == pinned
    assert settings_for(server(key(TargetTls()))) is None  # mitmproxy's own settings


def test_a_connection_keyswap_did_not_make_gets_mitmproxy_s_settings() -> None:
    assert settings_for(connection.Server(address=ADDRESS)) is None


def test_the_hop_to_an_https_proxy_uses_the_proxy_s_settings() -> None:
    proxy = UpstreamProxy.model_validate(
        {"type": "https", "host": "proxy", "port": 8443, "tls": {"ca_file": "/etc/corp.pem"}}
    )
    k = key(TargetTls(verify=False), proxy)
    assert settings_for(server(k, to_proxy=True)) == TargetTls(ca_file="/etc/corp.pem")
    assert settings_for(server(k)) == TargetTls(verify=False)
