from mitmproxy.http import Headers

from keyswap.config.model import HeaderRules
from keyswap.gateway.header_plan import Plan, request_plan, response_plan


def headers(**kw: str) -> Headers:
    return Headers(**{k.replace("_", "-"): v for k, v in kw.items()})


def filtered(h: Headers) -> dict[str, str]:
    Plan.of((), (), HeaderRules()).apply(h)
    return dict(h)


def test_hop_by_hop_and_connection_named_headers_go() -> None:
    h = headers(connection="close, x-hop", x_hop="1", keep_alive="5", te="trailers", x_keep="1")
    assert filtered(h) == {"connection": "close", "x-keep": "1"}


def test_framing_headers_are_never_dropped_even_when_named() -> None:
    h = headers(connection="content-length, transfer-encoding", content_length="3")
    assert filtered(h) == {"content-length": "3"}


def test_websocket_upgrade_survives() -> None:
    h = headers(connection="Upgrade", upgrade="websocket", sec_websocket_key="k")
    assert filtered(h) == {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-key": "k",
    }


def test_other_upgrades_do_not() -> None:
    h = headers(connection="Upgrade, HTTP2-Settings", upgrade="h2c", http2_settings="x")
    assert filtered(h) == {}


def test_infrastructure_headers_go_in_one_pass_keeping_order_and_duplicates() -> None:
    h = Headers(
        [
            (b"X-Forwarded-For", b"1"),
            (b"Accept", b"*/*"),
            (b"cf-ray", b"r"),
            (b"Forwarded", b"f"),
            (b"X-Real-IP", b"i"),
            (b"Cookie", b"a=1"),
            (b"Cookie", b"b=2"),
        ]
    )
    request_plan(HeaderRules()).apply(h)
    assert h.fields == ((b"Accept", b"*/*"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"))


def test_proxy_tokens_never_reach_the_target() -> None:
    h = headers(authorization="Bearer ks_x", x_proxy_token="ks_y", accept="*/*")
    request_plan(HeaderRules()).apply(h)
    assert dict(h) == {"accept": "*/*"}


def test_rules_strip_and_set_replacing_what_was_sent() -> None:
    h = Headers([(b"X-Team", b"client"), (b"X-Debug", b"1"), (b"Accept", b"*/*")])
    request_plan(HeaderRules(strip=["x-debug"], set={"x-team": "crm"})).apply(h)
    assert h.fields == ((b"Accept", b"*/*"), (b"x-team", b"crm"))


def test_the_targets_own_keyswap_and_cors_headers_never_reach_the_client() -> None:
    h = headers(keyswap_proxy_code="x", access_control_allow_origin="*", server="nginx")
    response_plan(HeaderRules(strip=["server"])).apply(h)
    assert dict(h) == {}


def test_equal_rules_make_equal_plans_so_reloads_share_header_decisions() -> None:
    rules = HeaderRules(strip=["x-debug"], set={"x-team": "a"})
    assert request_plan(rules) == request_plan(HeaderRules(strip=["x-debug"], set={"x-team": "a"}))
    assert hash(request_plan(rules)) == hash(request_plan(rules))
    assert request_plan(rules) != request_plan(HeaderRules(strip=["x-debug"]))
