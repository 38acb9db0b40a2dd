from mitmproxy.http import Headers

from keyswap.config import HeaderRules
from keyswap.headers import apply_rules, drop_hop_by_hop, drop_infrastructure


def headers(**kw: str) -> Headers:
    return Headers(**{k.replace("_", "-"): v for k, v in kw.items()})


def test_hop_by_hop_and_connection_named_headers_go() -> None:
    h = headers(connection="close, x-hop", x_hop="1", keep_alive="5", te="trailers", x_keep="1")
    drop_hop_by_hop(h)
    assert dict(h) == {"connection": "close", "x-keep": "1"}


def test_websocket_upgrade_survives() -> None:
    h = headers(connection="Upgrade", upgrade="websocket", sec_websocket_key="k")
    drop_hop_by_hop(h)
    assert h["connection"] == "upgrade" and h["upgrade"] == "websocket"


def test_other_upgrades_do_not() -> None:
    h = headers(connection="Upgrade, HTTP2-Settings", upgrade="h2c", http2_settings="x")
    drop_hop_by_hop(h)
    assert dict(h) == {}


def test_infrastructure_headers_go() -> None:
    h = headers(
        x_forwarded_for="1",
        X_Forwarded_Host="h",
        cf_ray="r",
        forwarded="f",
        x_real_ip="i",
        accept="*/*",
    )
    drop_infrastructure(h)
    assert dict(h) == {"accept": "*/*"}


def test_rules_strip_then_set() -> None:
    h = headers(x_debug="1", x_team="old")
    apply_rules(h, HeaderRules.model_validate({"strip": ["X-Debug"], "set": {"x-team": "sales"}}))
    assert dict(h) == {"x-team": "sales"}
