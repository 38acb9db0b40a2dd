import base64
import copy
from types import SimpleNamespace

import pytest
from mitmproxy import connection, http
from mitmproxy.test import tflow

from keyswap.config.model import Config, TargetTls
from keyswap.gateway import problem, wire
from keyswap.gateway.stages.upstream import (
    ABSOLUTE_FORM,
    PROXY_ANSWER,
    UPSTREAM,
    ConnectionKey,
    KeyedAddress,
    KeyedConnection,
    UpstreamProxies,
    addresses,
    connection_key,
    connection_request,
    proxy_answer,
    proxy_made,
)

CONFIG = Config.model_validate(
    {
        "upstream_proxies": {
            "right": {
                "host": "proxy.corp",
                "port": 3128,
                "auth": {"type": "basic", "user": "svc", "password": "right-pw"},
            },
            # the same proxy, other credentials: legal, and a connection of its own
            "wrong": {
                "host": "proxy.corp",
                "port": 3128,
                "auth": {"type": "basic", "user": "svc", "password": "wrong-pw"},
            },
            "secure": {"type": "https", "host": "proxy.corp", "port": 8443},
        },
        "credentials": {"k": {"type": "bearer", "token": "t"}},
        "targets": {
            "strict": {"base_url": "https://api.example.com", "credential": "k"},
            "strict-too": {"base_url": "https://api.example.com", "credential": "k"},
            "insecure": {
                "base_url": "https://api.example.com",
                "credential": "k",
                "tls": {"verify": False},
            },
            "via-right": {
                "base_url": "https://api.example.com",
                "credential": "k",
                "upstream_proxy": "right",
            },
            "via-wrong": {
                "base_url": "https://api.example.com",
                "credential": "k",
                "upstream_proxy": "wrong",
            },
            "plain-via-right": {
                "base_url": "http://api.example.com",
                "credential": "k",
                "upstream_proxy": "right",
            },
            "plain-via-secure": {
                "base_url": "http://api.example.com",
                "credential": "k",
                "upstream_proxy": "secure",
            },
        },
    }
)


def upstream_stage() -> UpstreamProxies:
    settings = SimpleNamespace(runtime=SimpleNamespace(config=CONFIG))
    return UpstreamProxies(settings)  # type: ignore[arg-type]


def request(url: str = "https://api.example.com/x") -> http.Request:
    return http.Request.make("GET", url)


def key(target: str, url: str = "https://api.example.com/x") -> ConnectionKey:
    return connection_key(CONFIG, target, request(url))


def made_for(k: ConnectionKey) -> connection.Server:
    """A connection as mitmproxy makes it when asked with this key (an open one)."""
    address, via = addresses(k)
    server = connection.Server(address=address, via=via)
    server.tls = k.tls is not None
    return server


def ask(k: ConnectionKey) -> KeyedConnection:
    return KeyedConnection.of(k)


def test_equal_settings_make_equal_keys() -> None:
    assert key("strict") == key("strict-too")
    assert ask(key("strict")).connection_spec_matches(made_for(key("strict-too")))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("strict", "insecure"),  # same address, other TLS settings
        ("via-right", "via-wrong"),  # same proxy address, other credentials
        ("strict", "via-right"),  # direct vs through a proxy
    ],
)
def test_a_connection_serves_only_its_own_key(one: str, other: str) -> None:
    assert key(one) != key(other)
    assert not ask(key(one)).connection_spec_matches(made_for(key(other)))
    assert not ask(key(other)).connection_spec_matches(made_for(key(one)))
    assert ask(key(one)).connection_spec_matches(made_for(key(one)))


def test_a_connection_keyswap_did_not_make_is_never_reused() -> None:
    k = key("strict")
    plain = connection.Server(address=("api.example.com", 443))
    plain.tls = True
    assert not ask(k).connection_spec_matches(plain)
    assert not ask(k).connection_spec_matches(
        connection.Client(peername=("1.2.3.4", 5), sockname=("5.6.7.8", 80))
    )


def test_keys_and_credentials() -> None:
    k = key("via-wrong")
    assert k.address == ("api.example.com", 443) and k.sni == "api.example.com"
    assert k.upstream_proxy == "wrong" and k.tls == TargetTls()
    assert "wrong-pw" not in repr(k)  # the key may be logged; the password stays hidden
    plain = key("plain-via-right", "http://api.example.com/x")
    assert plain.tls is None and plain.sni is None


def test_the_connection_for_each_way_to_a_target() -> None:
    assert addresses(key("strict")) == (("api.example.com", 443), None)
    address, via = addresses(key("via-right"))
    assert address == ("api.example.com", 443) and via == ("http", ("proxy.corp", 3128))
    assert isinstance(via[1], KeyedAddress) and via[1].to_proxy
    absolute = addresses(key("plain-via-right", "http://api.example.com/x"))
    assert absolute == (("proxy.corp", 3128), None)
    # an https proxy is always a tunnel, even for a plain-http target
    secure = addresses(key("plain-via-secure", "http://api.example.com/x"))
    assert secure[1] == ("https", ("proxy.corp", 8443))


def test_keyed_address_is_a_plain_address_to_everyone_else() -> None:
    k = key("via-right")
    address = KeyedAddress("api.example.com", 443, k)
    assert address == ("api.example.com", 443)
    assert hash(address) == hash(("api.example.com", 443))
    assert {("api.example.com", 443): 1}[address] == 1
    for again in (copy.copy(address), copy.deepcopy(address)):
        assert isinstance(again, KeyedAddress) and again.key == k and again == address
    # saved flows hold the address, not the key
    state = connection.Server(address=address).get_state()
    assert type(state["address"]) is tuple


def test_the_upstream_stage_keys_every_granted_flow() -> None:
    stage = upstream_stage()
    flow = tflow.tflow()
    flow.request = request("http://api.example.com/x")
    flow.metadata[problem.TARGET] = "plain-via-right"
    stage.requestheaders(flow)
    assert flow.metadata[UPSTREAM] == "right" and flow.metadata[ABSOLUTE_FORM]
    assert (flow.request.host, flow.request.port) == ("proxy.corp", 3128)
    # the flow shows the mask; the request written to the proxy carries the credentials
    assert flow.request.headers["proxy-authorization"] == "********"
    assert wire.for_wire(flow, flow.request).headers["proxy-authorization"].startswith("Basic ")
    asked = connection_request(flow)
    assert asked is not None and asked.key is not None and asked.key.upstream_proxy == "right"
    assert asked.address == ("proxy.corp", 3128)  # absolute form: the proxy is the peer
    assert connection_request(tflow.tflow()) is None  # a flow the stage did not key

    # the CONNECT of a tunnel carries the credentials of the tunnel's own proxy
    for target, password in (("via-right", "right-pw"), ("via-wrong", "wrong-pw")):
        via = addresses(key(target))[1]
        assert via is not None
        connect = tflow.tflow()
        connect.server_conn = connection.Server(address=via[1])
        stage.http_connect_upstream(connect)
        sent = connect.request.headers["proxy-authorization"]
        assert base64.b64decode(sent.split()[1]).decode() == f"svc:{password}"


def squid(status: int, via: list[str], marked: bool = True) -> http.Response:
    headers = {"server": "squid/5.7"}
    if marked:
        headers["x-squid-error"] = "ERR_CONNECT_FAIL 111"
    response = http.Response.make(status, b"<html>Connection to 10.1.2.3 failed</html>", headers)
    for hop in via:
        response.headers.add("via", hop)
    return response


@pytest.mark.parametrize(
    ("response", "made"),
    [
        (squid(503, ["1.1 proxy (squid/5.7)"]), True),
        (squid(503, []), True),  # `via off` on the proxy
        (squid(503, ["1.1 proxy (squid/5.7)"], marked=False), False),  # the target's 503
        (squid(503, ["1.1 inner (squid/6)", "1.1 proxy (squid/5.7)"]), False),  # target's squid
        (squid(503, ["1.1 inner (squid/6), 1.1 proxy (squid/5.7)"]), False),
        (http.Response.make(407), True),
        (http.Response.make(200), False),
    ],
)
def test_what_the_proxy_made_itself(response: http.Response, made: bool) -> None:
    assert proxy_made(response) is made


def test_the_proxy_answer_names_no_address() -> None:
    phrase, detail = proxy_answer(squid(503, ["1.1 proxy (squid/5.7)"]))
    assert phrase == (
        "upstream proxy answered 503 itself (ERR_CONNECT_FAIL: it could not connect to the target)"
    )
    assert "ERR_CONNECT_FAIL 111" in detail and "10.1.2.3" not in phrase + detail
    assert proxy_answer(http.Response.make(407))[0] == "upstream proxy refused authentication (407)"


def test_a_proxy_answer_becomes_a_gateway_502() -> None:
    stage = upstream_stage()
    flow = tflow.tflow()
    flow.metadata.update({problem.TARGET: "t", UPSTREAM: "corp", ABSOLUTE_FORM: True})
    flow.response = squid(503, ["1.1 proxy (squid/5.7)"])
    stage.responseheaders(flow)
    assert flow.metadata[PROXY_ANSWER] and flow.response.stream is False
    stage.response(flow)
    assert flow.response.status_code == 502
    assert flow.response.headers["keyswap-proxy-code"] == "proxy-error"
    message = flow.response.headers["keyswap-proxy-message"]
    assert message.startswith("target 't' via upstream proxy 'corp' failed: upstream proxy")
    assert "ERR_CONNECT_FAIL 111" in flow.metadata[problem.ERROR]


def test_a_target_answer_through_the_proxy_is_left_alone() -> None:
    stage = upstream_stage()
    flow = tflow.tflow()
    flow.metadata.update({problem.TARGET: "t", UPSTREAM: "corp", ABSOLUTE_FORM: True})
    flow.response = squid(503, ["1.1 proxy (squid/5.7)"], marked=False)
    stage.responseheaders(flow)
    stage.response(flow)
    assert flow.response.status_code == 503 and PROXY_ANSWER not in flow.metadata
