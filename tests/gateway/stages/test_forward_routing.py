"""The forward router on flows as mitmproxy's regular mode hands them over (the clients
behind HTTPS_PROXY, the CONNECT and the TLS handshake are in tests/e2e/test_forward.py)."""

import base64
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from keyswap.config.loader import load_config
from keyswap.config.secrets import Redaction
from keyswap.config.tokens import digest, new_token
from keyswap.gateway import problem
from keyswap.gateway.runtime import Runtime
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.forward_routing import ForwardRouter

SECRET = "fwd-unit-secret-1234"
TOKENS = {"chat": new_token(), "batch": new_token(), "maps": new_token()}


@pytest.fixture
def router(tmp_path: Path) -> ForwardRouter:
    path = tmp_path / "keyswap.yaml"
    path.write_text(
        f"""
credentials:
  k: {{ type: bearer, token: {SECRET} }}
  m: {{ type: query, name: key, value: maps-secret-value }}
targets:
  openai: {{ base_url: "https://api.openai.com/v1", credential: k }}
  maps: {{ base_url: "http://maps.example", credential: m }}
proxies:
  chat: {{ target: openai, tokens: [{{ id: a, sha256: {digest(TOKENS["chat"])} }}] }}
  batch: {{ target: openai, tokens: [{{ id: a, sha256: {digest(TOKENS["batch"])} }}] }}
  maps: {{ target: maps, tokens: [{{ id: a, sha256: {digest(TOKENS["maps"])} }}] }}
forward: {{ passthrough: [pypi.org] }}
"""
    )
    settings = Settings()
    loaded = load_config(path, {})
    settings.runtime = Runtime.build(loaded)
    redaction = Redaction(loaded.config)
    return ForwardRouter(settings, lambda: redaction)


def forward_flow(url: str, **headers: str) -> http.HTTPFlow:
    request = http.Request.make("GET", url, b"", headers)
    flow = tflow.tflow(req=request)
    flow.client_conn.proxy_mode = ProxyMode.parse("regular")
    flow.client_conn.tls = request.scheme == "https"
    flow.client_conn.sni = request.host if flow.client_conn.tls else None
    request.authority = ""  # origin-form, as HTTP/1 clients send it
    return flow


def connect(router: ForwardRouter, flow: http.HTTPFlow) -> None:
    tunnel = http.Request.make("CONNECT", f"http://{flow.request.host}:{flow.request.port}/")
    opening = tflow.tflow(req=tunnel)
    opening.client_conn = flow.client_conn
    opening.request.data.method = b"CONNECT"
    router.http_connect(opening)
    assert opening.response is None


def decided(router: ForwardRouter, flow: http.HTTPFlow) -> tuple[int | None, str | None]:
    router.requestheaders(flow)
    body = flow.response.json() if flow.response else None
    return (flow.response.status_code if flow.response else None), (
        body["error"]["code"] if body else flow.metadata.get(problem.PROXY)
    )


def test_the_token_picks_one_of_the_proxies_that_serve_the_origin(router: ForwardRouter) -> None:
    for proxy in ("chat", "batch"):
        flow = forward_flow(
            "https://api.openai.com/v1/models", authorization=f"Bearer {TOKENS[proxy]}"
        )
        connect(router, flow)
        assert decided(router, flow) == (None, proxy)
        assert flow.metadata[problem.REST] == "/https://api.openai.com/v1/models"
        assert flow.metadata[problem.PATH] == "https://api.openai.com/v1/models"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, (401, "missing-token")),
        ({"authorization": "Bearer sk-placeholder"}, (401, "wrong-token")),
        ({"authorization": f"Bearer {TOKENS['maps']}"}, (403, "host")),  # another origin's
        ({"authorization": f"Bearer {SECRET}"}, (403, "secret-in-request")),
        ({"host": "evil.example"}, (403, "host")),
        ({"host": "api.openai.com:8443"}, (403, "host")),
        ({"host": "API.OpenAI.com:443"}, (401, "missing-token")),  # the same origin
    ],
)
def test_refusals(
    router: ForwardRouter, headers: dict[str, str], expected: tuple[int, str]
) -> None:
    flow = forward_flow("https://api.openai.com/v1/models")
    if "host" in headers:
        flow.request.headers["host"] = headers.pop("host")
    flow.request.headers.update(headers)
    connect(router, flow)
    assert decided(router, flow) == expected


def test_a_refused_secret_is_masked_on_the_flow(router: ForwardRouter) -> None:
    flow = forward_flow(f"https://api.openai.com/v1/x?leak={SECRET}", **{"x-debug": SECRET})
    connect(router, flow)
    router.requestheaders(flow)
    assert SECRET not in flow.request.path and flow.request.headers["x-debug"] == "********"


def test_the_tls_server_name_must_be_the_tunnels_host(router: ForwardRouter) -> None:
    flow = forward_flow("https://api.openai.com/v1/x", authorization=f"Bearer {TOKENS['chat']}")
    connect(router, flow)
    flow.client_conn.sni = "evil.example"
    assert decided(router, flow) == (403, "host")


def test_the_destination_is_the_tunnels_not_the_requests(router: ForwardRouter) -> None:
    flow = forward_flow("https://api.openai.com/v1/x", authorization=f"Bearer {TOKENS['chat']}")
    connect(router, flow)
    flow.request.host = "evil.example"  # whatever the request says afterwards
    flow.request.headers["host"] = "api.openai.com"
    router.requestheaders(flow)
    assert flow.metadata[problem.FORWARD] == "https://api.openai.com"
    assert flow.metadata[problem.REST] == "/https://api.openai.com/v1/x"
    assert flow.metadata[problem.PROXY] == "chat"


def test_a_path_must_start_with_a_slash(router: ForwardRouter) -> None:
    # an HTTP/2 :path may be anything: `:8443/x` after the origin would move the port
    flow = forward_flow("https://api.openai.com/v1/x", authorization=f"Bearer {TOKENS['chat']}")
    connect(router, flow)
    flow.request.data.path = b":8443/x"
    assert decided(router, flow) == (400, "bad-request")


def test_an_upgrade_other_than_websocket_is_refused(router: ForwardRouter) -> None:
    flow = forward_flow(
        "https://api.openai.com/v1/x", authorization=f"Bearer {TOKENS['chat']}", upgrade="h2c"
    )
    connect(router, flow)
    assert decided(router, flow) == (400, "bad-request")


def test_a_secret_as_part_of_a_basic_pair_is_refused(router: ForwardRouter) -> None:
    pair = base64.b64encode(f"anyone:{SECRET}".encode()).decode()
    flow = forward_flow("https://api.openai.com/v1/x", authorization=f"Basic {pair}")
    connect(router, flow)
    assert decided(router, flow) == (403, "secret-in-request")
    assert flow.request.headers["authorization"] == "********"  # the flow may be saved


def test_tunnels_are_forgotten_when_the_client_leaves_and_one_connection_has_one(
    router: ForwardRouter,
) -> None:
    flow = forward_flow("https://api.openai.com/v1/x")
    connect(router, flow)
    elsewhere = tflow.tflow(req=http.Request.make("CONNECT", "http://maps.example:80/"))
    elsewhere.client_conn = flow.client_conn
    router.http_connect(elsewhere)  # a second tunnel on the same connection, elsewhere
    assert elsewhere.response is not None and elsewhere.response.status_code == 400
    router.client_disconnected(flow.client_conn)
    assert router.tunnels == {}


def test_a_plain_passthrough_request_goes_on_untouched_but_never_with_a_token(
    router: ForwardRouter,
) -> None:
    flow = forward_flow("http://pypi.org/simple/")
    assert decided(router, flow) == (None, None)
    assert flow.metadata[problem.PASSTHROUGH] is True
    flow = forward_flow("http://pypi.org/simple/", authorization=f"Bearer {TOKENS['chat']}")
    assert decided(router, flow) == (403, "token-to-passthrough")


def test_a_plain_http_request_goes_to_its_absolute_urls_origin(router: ForwardRouter) -> None:
    flow = forward_flow(f"http://maps.example/tiles?key={TOKENS['maps']}")
    assert decided(router, flow) == (None, "maps")
    assert TOKENS["maps"] not in flow.metadata[problem.PATH]


def test_a_connect_elsewhere_is_refused(router: ForwardRouter) -> None:
    opening = tflow.tflow(req=http.Request.make("CONNECT", "http://evil.example:443/"))
    opening.request.data.method = b"CONNECT"
    router.http_connect(opening)
    assert opening.response is not None and opening.response.status_code == 403


def test_reverse_mode_flows_are_left_to_the_router(router: ForwardRouter) -> None:
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://unused.invalid")
    router.requestheaders(flow)
    assert problem.FORWARD not in flow.metadata and flow.response is None
