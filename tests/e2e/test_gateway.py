"""End to end: a real gateway (`keyswap serve`), real targets, a real client, on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from keyswap.config.tokens import digest, new_token
from tests.support.processes import Gateway, Process, free_port, start_echo_target, start_gateway

pytestmark = pytest.mark.e2e

SECRETS = {
    "bearer": "sk-bearer-e2e-3f9a7c",
    "basic": "pw-basic-e2e-81d2e0",
    "header": "hdr-secret-e2e-c4b1aa",
    "query": "qry-secret-e2e-5e6f70",
    "tls": "tls-secret-e2e-99aa00",
}


@dataclass
class World:
    gateway: Gateway
    echo: Process
    tls_echo: Process
    tokens: dict[str, str]
    tmp: Path

    def url(self, path: str) -> str:
        return self.gateway.url + path

    def get(self, path: str, proxy: str = "bearer", **kw: object) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.tokens[proxy]}", **kw.pop("headers", {})}  # type: ignore[dict-item]
        return httpx.get(self.url(path), headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def config_text(tokens: dict[str, str], echo: int, tls_echo: int, ca: Path, blackhole: int) -> str:
    def tok(name: str) -> str:
        return f"[{{ id: t, sha256: {digest(tokens[name])} }}]"

    dead = free_port()
    return f"""\
version: 1
environment: dev
credentials:
  bearer: {{ type: bearer, token: "${{env:E2E_BEARER}}" }}
  basic:  {{ type: basic, username: svc, password: "${{env:E2E_BASIC}}" }}
  header: {{ type: header, name: x-api-key, value: "${{env:E2E_HEADER}}" }}
  query:  {{ type: query, name: key, value: "${{env:E2E_QUERY}}" }}
  tls:    {{ type: bearer, token: "${{env:E2E_TLS}}" }}
targets:
  echo:   {{ base_url: "http://127.0.0.1:{echo}", credential: bearer }}
  based:  {{ base_url: "http://127.0.0.1:{echo}/v2", credential: bearer }}
  basic:  {{ base_url: "http://127.0.0.1:{echo}", credential: basic }}
  header: {{ base_url: "http://127.0.0.1:{echo}", credential: header }}
  query:  {{ base_url: "http://127.0.0.1:{echo}", credential: query }}
  tls:    {{ base_url: "https://localhost:{tls_echo}", credential: tls, tls: {{ ca_file: "{ca}" }} }}
  dead:   {{ base_url: "http://127.0.0.1:{dead}", credential: bearer }}
  slow:   {{ base_url: "http://127.0.0.1:{echo}", credential: bearer, timeout_s: 1 }}
  hole:   {{ base_url: "http://127.0.0.1:{blackhole}", credential: bearer, connect_timeout_s: 1 }}
proxies:
  bearer:
    target: echo
    routes: [/api/crm-prod]
    request_headers: {{ strip: [x-debug], set: {{ x-team: sales }} }}
    response_headers: {{ strip: [server] }}
    tokens: {tok("bearer")}
  short:
    target: echo
    routes: [/api/crm]
    tokens: {tok("short")}
  based: {{ target: based, tokens: {tok("based")} }}
  basic: {{ target: basic, tokens: {tok("basic")} }}
  header: {{ target: header, tokens: {tok("header")} }}
  query: {{ target: query, tokens: {tok("query")} }}
  tls: {{ target: tls, tokens: {tok("tls")} }}
  disabled: {{ target: echo, active: false, tokens: {tok("disabled")} }}
  prodonly: {{ target: echo, environments: [prod], tokens: {tok("prodonly")} }}
  ruled:
    target: echo
    methods: [GET, POST]
    rules:
      - {{ deny: {{ methods: [POST], path: /admin/** }} }}
      - {{ allow: {{ path: /public/** }} }}
      - {{ deny: {{}} }}
    tokens: {tok("ruled")}
  web:
    target: echo
    allowed_origins: [https://app.example.com]
    tokens: {tok("web")}
  limited: {{ target: echo, rate_limit: 3/min, tokens: {tok("limited")} }}
  dead: {{ target: dead, tokens: {tok("dead")} }}
  slow: {{ target: slow, tokens: {tok("slow")} }}
  hole: {{ target: hole, tokens: {tok("hole")} }}
"""


NAMES = ["bearer", "short", "based", "basic", "header", "query", "tls", "disabled", "prodonly"]
NAMES += ["ruled", "web", "limited", "dead", "slow", "hole"]
ENV = {
    "E2E_BEARER": SECRETS["bearer"],
    "E2E_BASIC": SECRETS["basic"],
    "E2E_HEADER": SECRETS["header"],
    "E2E_QUERY": SECRETS["query"],
    "E2E_TLS": SECRETS["tls"],
}


@pytest.fixture(scope="module")
def blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: connecting to it hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    server.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, blackhole: int) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("e2e")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    echo = start_echo_target(tmp)
    tls_echo = start_echo_target(tmp, tmp / "server.pem", tmp / "server.pem")
    tokens = {name: new_token() for name in NAMES}
    config = tmp / "keyswap.yaml"
    config.write_text(config_text(tokens, echo.port, tls_echo.port, tmp / "ca.pem", blackhole))
    stream = tmp / "flows.mitm"
    gateway = start_gateway(config, tmp, extra=["--set", f"save_stream_file={stream}"], env=ENV)
    yield World(gateway, echo, tls_echo, tokens, tmp)
    gateway.stop()
    echo.stop()
    tls_echo.stop()


def echoed(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    assert response.headers["keyswap-proxy-code"] == "proxy-access-granted"
    return json.loads(response.text)  # type: ignore[no-any-return]


# --- the swap ---------------------------------------------------------------------


def test_bearer_swap_and_header_filtering(world: World) -> None:
    r = world.get(
        "/api/crm-prod/crm/v3/owners?limit=5&x=a%20b",
        headers={
            "x-proxy-token": world.tokens["bearer"],  # preferred over Authorization
            "authorization": "Bearer the-clients-own",
            "x-forwarded-for": "1.2.3.4",
            "x-forwarded-proto": "https",
            "x-real-ip": "1.2.3.4",
            "forwarded": "for=1.2.3.4",
            "cf-connecting-ip": "1.2.3.4",
            "x-amzn-trace-id": "Root=1",
            "x-request-id": "abc",
            "true-client-ip": "1.2.3.4",
            "cdn-loop": "cloudflare",
            "x-debug": "1",
            "keep-alive": "timeout=5",
            "connection": "x-private-hop",
            "x-private-hop": "secret-hop",
            "proxy-authorization": "Basic Zm9vOmJhcg==",
            "x-keep": "yes",
        },
    )
    body = echoed(r)
    headers = body["headers"]
    assert isinstance(headers, dict)
    assert body["path"] == "/crm/v3/owners" and body["query"] == "limit=5&x=a%20b"
    assert headers["authorization"] == f"Bearer {SECRETS['bearer']}"
    assert headers["host"] == f"127.0.0.1:{world.echo.port}"
    assert headers["x-team"] == "sales" and headers["x-keep"] == "yes"
    for gone in (
        "x-proxy-token",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
        "cf-connecting-ip",
        "x-amzn-trace-id",
        "x-request-id",
        "true-client-ip",
        "cdn-loop",
        "x-debug",
        "keep-alive",
        "x-private-hop",
        "proxy-authorization",
    ):
        assert gone not in headers, gone
    assert world.tokens["bearer"] not in r.text
    assert "server" not in r.headers  # response_headers.strip
    assert r.headers["keyswap-request-id"]


def test_basic_swap(world: World) -> None:
    headers = echoed(world.get("/api/basic/x", "basic"))["headers"]
    expected = base64.b64encode(f"svc:{SECRETS['basic']}".encode()).decode()
    assert headers["authorization"] == f"Basic {expected}"  # type: ignore[index]


def test_header_swap_replaces_the_clients_own(world: World) -> None:
    r = world.get("/api/header/x", "header", headers={"x-api-key": "client-supplied"})
    headers = echoed(r)["headers"]
    assert headers["x-api-key"] == SECRETS["header"]  # type: ignore[index]
    assert "authorization" not in headers  # type: ignore[operator]


def test_query_swap_keeps_the_rest_of_the_query(world: World) -> None:
    r = world.get("/api/query/search?q=a+b&key=client&z=%2F", "query")
    assert echoed(r)["query"] == f"q=a+b&z=%2F&key={SECRETS['query']}"


def test_https_target_with_its_own_ca(world: World) -> None:
    headers = echoed(world.get("/api/tls/secure", "tls"))["headers"]
    assert headers["authorization"] == f"Bearer {SECRETS['tls']}"  # type: ignore[index]


def test_base_path_and_target_response_unchanged(world: World) -> None:
    r = world.get("/api/based/items?a=1", "based")
    assert echoed(r)["path"] == "/v2/items"
    r = world.get("/api/crm-prod/status/418")
    assert r.status_code == 418 and r.json() == {"status": 418}
    assert r.headers["keyswap-proxy-code"] == "proxy-access-granted"


def test_post_body_passes_unchanged(world: World) -> None:
    r = httpx.post(
        world.url("/api/crm-prod/items"),
        headers={"authorization": world.tokens["bearer"]},  # bare token form
        json={"name": "x", "n": [1, 2]},
    )
    body = echoed(r)
    assert body["method"] == "POST" and json.loads(str(body["body"])) == {"name": "x", "n": [1, 2]}


def test_curl_sees_the_swap(world: World) -> None:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-i",
            world.url("/api/crm-prod/hello"),
            "-H",
            f"x-proxy-token: {world.tokens['bearer']}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "keyswap-proxy-code: proxy-access-granted" in out
    assert f"Bearer {SECRETS['bearer']}" in out  # the echo target shows what it got


def websocket_roundtrip(world: World, token: str) -> bytes:
    key = base64.b64encode(b"0123456789abcdef").decode()
    with socket.create_connection(("127.0.0.1", world.gateway.port), timeout=10) as s:
        s.sendall(
            f"GET /api/crm-prod/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"x-proxy-token: {token}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        if not head.startswith(b"HTTP/1.1 101"):
            return head
        s.sendall(
            b"\x81\x85"
            + b"\x01\x02\x03\x04"
            + bytes(c ^ b"\x01\x02\x03\x04"[i % 4] for i, c in enumerate(b"hello"))
        )
        frame = b""
        while len(frame) < 4 or len(frame) < 4 + int.from_bytes(frame[2:4], "big"):
            chunk = s.recv(65536)
            if not chunk:
                break
            frame += chunk
        # the echo target always uses the 16-bit length form; a close frame may follow
        return head + b"\n\n" + frame[4 : 4 + int.from_bytes(frame[2:4], "big")]


def test_websocket_upgrade_goes_through_the_same_pipeline(world: World) -> None:
    out = websocket_roundtrip(world, world.tokens["bearer"])
    head, _, message = out.partition(b"\n\n")
    assert head.startswith(b"HTTP/1.1 101"), out
    assert b"keyswap-proxy-code: proxy-access-granted" in head.lower()
    reply = json.loads(message)
    assert reply["message"] == "hello"
    seen = {k.lower(): v for k, v in reply["headers"].items()}
    assert seen["authorization"] == f"Bearer {SECRETS['bearer']}"
    assert "x-proxy-token" not in seen
    denied = websocket_roundtrip(world, "ks_wrong")
    assert denied.startswith(b"HTTP/1.1 401")


# --- denied -----------------------------------------------------------------------


def problem(r: httpx.Response, status: int, reason: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["keyswap-proxy-code"] == "proxy-access-denied"
    body = json.loads(r.text)
    assert body["type"] == f"urn:keyswap:problem:{reason}"
    assert body["status"] == status and body["request_id"] == r.headers["keyswap-request-id"]
    assert body["detail"] == r.headers["keyswap-proxy-message"]
    return body  # type: ignore[no-any-return]


def test_no_token(world: World) -> None:
    r = httpx.get(world.url("/api/crm-prod/x"))
    problem(r, 401, "missing-token")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_token(world: World) -> None:
    problem(
        httpx.get(world.url("/api/crm-prod/x"), headers={"authorization": "Bearer ks_nope"}),
        401,
        "wrong-token",
    )


def test_another_proxys_token(world: World) -> None:
    problem(world.get("/api/crm-prod/x", "short"), 401, "wrong-token")


def test_inactive_proxy(world: World) -> None:
    problem(world.get("/api/disabled/x", "disabled"), 403, "inactive")


def test_proxy_not_in_this_environment(world: World) -> None:
    problem(world.get("/api/prodonly/x", "prodonly"), 403, "not-served")


def test_unknown_route(world: World) -> None:
    problem(world.get("/nothing/here"), 404, "unknown-route")
    problem(world.get("/_keyswap/nothing"), 404, "unknown-route")


def test_routes_match_whole_segments(world: World) -> None:
    # /api/crm belongs to `short`; /api/crm-prod to `bearer`, whatever the prefix overlap.
    assert echoed(world.get("/api/crm/x", "short"))["path"] == "/x"
    problem(world.get("/api/crm-prodx/y", "bearer"), 404, "unknown-route")
    problem(world.get("/api/crm-prod/y", "short"), 401, "wrong-token")


def test_method_not_allowed(world: World) -> None:
    r = httpx.delete(
        world.url("/api/ruled/public/x"),
        headers={"authorization": f"Bearer {world.tokens['ruled']}"},
    )
    problem(r, 405, "method")
    assert r.headers["allow"] == "GET, POST"


def test_rules(world: World) -> None:
    assert echoed(world.get("/api/ruled/public/a/b", "ruled"))["path"] == "/public/a/b"
    problem(world.get("/api/ruled/private", "ruled"), 403, "rule")
    auth = {"authorization": f"Bearer {world.tokens['ruled']}"}
    problem(httpx.post(world.url("/api/ruled/admin/x"), headers=auth), 403, "rule")
    # an encoded path cannot slip past a rule
    problem(world.get("/api/ruled/%70rivate", "ruled"), 403, "rule")
    problem(world.get("/api/ruled/public/../private", "ruled"), 403, "rule")


def test_origin(world: World) -> None:
    ok = world.get("/api/web/x", "web", headers={"origin": "https://app.example.com"})
    assert echoed(ok) and ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "keyswap-proxy-code" in ok.headers["access-control-expose-headers"]
    problem(world.get("/api/web/x", "web", headers={"origin": "https://evil.test"}), 403, "origin")
    problem(
        world.get("/api/crm-prod/x", headers={"origin": "https://app.example.com"}), 403, "origin"
    )


def test_preflight_needs_no_token(world: World) -> None:
    r = httpx.options(
        world.url("/api/web/x"),
        headers={
            "origin": "https://app.example.com",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert r.headers["keyswap-proxy-code"] == "proxy-access-granted"
    bad = httpx.options(
        world.url("/api/web/x"),
        headers={"origin": "https://evil.test", "access-control-request-method": "POST"},
    )
    problem(bad, 403, "origin")


def test_rate_limit(world: World) -> None:
    statuses = [world.get("/api/limited/x", "limited").status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200]
    r = world.get("/api/limited/x", "limited")
    problem(r, 429, "rate-limit")
    assert 1 <= int(r.headers["retry-after"]) <= 60


# --- hostile input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "rest",
    [
        "/https://evil.test/x",
        "/https://127.0.0.2/x",
        "/http://127.0.0.1:{echo}@evil.test/",
        "/https://127.0.0.1:{echo}/x",  # right host, wrong scheme
        "/http://127.0.0.1:1/x",  # right host, wrong port
        "/https:%2F%2Fevil.test/x",
        "/%2e%2e/x",
        "/%2E%2e%2fx",
        "/..%2f..%2fetc",
        "/%252e%252e/x",
        "/..\\x",
    ],
)
def test_nothing_leaves_the_target(world: World, rest: str) -> None:
    path = "/api/crm-prod" + rest.format(echo=world.echo.port)
    problem(world.get(path), 403, "host")


@pytest.mark.parametrize("rest", ["/..", "/../x", "/a/../../x", "/a/./../../x"])
def test_dot_segments_sent_raw(world: World, rest: str) -> None:
    # httpx would resolve these client-side; a hostile client does not.
    token = world.tokens["bearer"]
    out = raw_request(
        world,
        f"GET /api/crm-prod{rest} HTTP/1.1\r\nHost: a\r\nx-proxy-token: {token}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert out.startswith(b"HTTP/1.1 403 "), out[:200]
    assert b"urn:keyswap:problem:host" in out


def test_full_url_to_the_target_itself(world: World) -> None:
    r = world.get(f"/api/crm-prod/http://127.0.0.1:{world.echo.port}/crm/v3/owners?x=1")
    body = echoed(r)
    assert body["path"] == "/crm/v3/owners" and body["query"] == "x=1"


def raw_request(world: World, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", world.gateway.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and len(b"".join(chunks)) > 200:
                s.settimeout(0.5)
    return b"".join(chunks)


def test_absolute_form_request_line_goes_to_the_target_only(world: World) -> None:
    token = world.tokens["bearer"]
    out = raw_request(
        world,
        f"GET http://evil.test/api/crm-prod/x HTTP/1.1\r\nHost: evil.test\r\n"
        f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    echoed_headers = json.loads(body)["headers"]
    assert echoed_headers["host"] == f"127.0.0.1:{world.echo.port}"


def test_spoofed_host_is_ignored(world: World) -> None:
    r = world.get("/api/crm-prod/x", headers={"host": "evil.test"})
    assert echoed(r)["headers"]["host"] == f"127.0.0.1:{world.echo.port}"  # type: ignore[index]


@pytest.mark.parametrize(
    "data",
    [
        b"GET /api/crm-prod/x HTTP/1.1\r\nHost: a\r\nX-Bad: a\rInjected: b\r\n\r\n",
        b"GET /api/crm-prod/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"GET /api/crm-prod/\xff\xfe HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,
        b"GARBAGE\r\n\r\n",
    ],
    ids=["crlf", "huge-header", "bad-utf8", "tls-hello", "garbage"],
)
def test_hostile_bytes_never_crash_the_gateway(world: World, data: bytes) -> None:
    out = raw_request(world, data)
    assert b"Bearer " + SECRETS["bearer"].encode() not in out
    if out.startswith(b"HTTP/1.1 "):
        assert int(out[9:12]) in (400, 401, 403, 404, 413, 431, 502)
    # and the gateway still serves
    assert echoed(world.get("/api/crm-prod/alive"))


# --- target failures --------------------------------------------------------------


def failed(r: httpx.Response, status: int, reason: str, target: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["keyswap-proxy-code"] == "proxy-error"
    body = r.json()
    assert body["type"] == f"urn:keyswap:problem:{reason}"
    assert f"target '{target}'" in body["detail"]


def test_target_down(world: World) -> None:
    failed(world.get("/api/dead/x", "dead"), 502, "unreachable", "dead")


def test_target_slow(world: World) -> None:
    started = time.monotonic()
    failed(world.get("/api/slow/slow?s=5", "slow"), 504, "timeout", "slow")
    assert time.monotonic() - started < 4


def test_connect_timeout(world: World) -> None:
    started = time.monotonic()
    failed(world.get("/api/hole/x", "hole"), 504, "timeout", "hole")
    assert time.monotonic() - started < 5


def test_target_closes_mid_body(world: World) -> None:
    failed(world.get("/api/crm-prod/close-mid-body"), 502, "unreachable", "echo")


# --- secrets ----------------------------------------------------------------------


def test_secrets_never_leave(world: World) -> None:
    # A gateway of its own, so the dump holds only flows whose target does not
    # reflect what it received (the echo target would, by design).
    stream = world.tmp / "secrets.mitm"
    gateway = start_gateway(
        world.gateway.config, world.tmp, extra=["--set", f"save_stream_file={stream}"], env=ENV
    )
    try:
        for proxy in ("bearer", "basic", "header", "query", "tls", "dead"):
            route = "/api/crm-prod" if proxy == "bearer" else f"/api/{proxy}"
            r = httpx.get(
                f"{gateway.url}{route}/status/204?key=client",
                headers={"authorization": f"Bearer {world.tokens[proxy]}"},
                timeout=30,
            )
            assert r.status_code in (204, 502)
            assert all(s not in r.text for s in SECRETS.values())
        # refused, but with a valid token: the token must not be stored either
        r = httpx.delete(
            f"{gateway.url}/api/ruled/x", headers={"x-proxy-token": world.tokens["ruled"]}
        )
        assert r.status_code == 405
    finally:
        gateway.stop()
    dump = stream.read_bytes()
    output = gateway.output()
    assert dump.count(b"8:response;") >= 5, "the flows were not saved"
    basic = base64.b64encode(f"svc:{SECRETS['basic']}".encode()).decode()
    for name, secret in {**SECRETS, "basic-header": basic}.items():
        assert secret.encode() not in dump, f"{name} secret in the saved flows"
        assert secret not in output, f"{name} secret in the gateway's output"
    for token in world.tokens.values():
        assert token.encode() not in dump and token not in output


def test_flows_in_flight_at_shutdown_are_saved_masked(world: World) -> None:
    """mitmproxy's Save addon writes the flows still in flight when it stops."""
    stream = world.tmp / "in-flight.mitm"
    gateway = start_gateway(
        world.gateway.config, world.tmp, extra=["--set", f"save_stream_file={stream}"], env=ENV
    )
    pending = []
    with ThreadPoolExecutor(4) as pool:
        for proxy in ("bearer", "basic", "header", "query"):
            route = "/api/crm-prod" if proxy == "bearer" else f"/api/{proxy}"
            headers = {"authorization": f"Bearer {world.tokens[proxy]}"}
            url = f"{gateway.url}{route}/slow?s=30&key=client"
            pending.append(pool.submit(httpx.get, url, headers=headers, timeout=60))
        deadline = time.monotonic() + 10
        while gateway.output().count("keyswap") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the four requests are at the target, waiting
        gateway.stop()
        for future in pending:
            with contextlib.suppress(Exception):
                future.result()
    dump = stream.read_bytes()
    assert dump.count(b"slow") >= 4, "the in-flight flows were not saved"
    basic = base64.b64encode(f"svc:{SECRETS['basic']}".encode()).decode()
    for name, secret in {**SECRETS, "basic-header": basic}.items():
        assert secret.encode() not in dump, f"{name} secret in a flow saved in flight"
