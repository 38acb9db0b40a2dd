"""End to end through real upstream proxies: squid with basic auth, stunnel in front
of squid as an HTTPS proxy, and a dead port; direct targets in the same gateway."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from keyswap.config.tokens import digest, new_token
from tests.support import token_for
from tests.support.processes import (
    BIN,
    Gateway,
    Process,
    free_port,
    start_echo_target,
    start_gateway,
)
from tests.support.proxies import Squid, have_squid, start_squid, start_stunnel

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not have_squid(),
        reason="squid, basic_ncsa_auth and htpasswd are needed (.ci/run installs them)",
    ),
]

PROXY_USER = "svc-gw"
PROXY_PASSWORD = "corp-proxy-pw-7d1e"
TARGET_SECRET = "target-secret-via-proxy-42"


@dataclass
class Net:
    gateway: Gateway
    squid: Squid
    stunnel: Process
    echo: Process
    tls_echo: Process
    token: str
    tmp: Path
    config: str
    gone: int

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.gateway.url + path, headers={"x-proxy-token": self.token}, timeout=30)


def config(
    echo: int, tls_echo: int, squid: int, stunnel: int, ca: Path, token: str, gone: int
) -> str:
    dead, prod = free_port(), free_port()
    tok = f"[{{ id: t, sha256: {digest(token)} }}]"
    return f"""\
version: 1
environment: ${{env:KS_ENV:-dev}}
params:
  dev:  {{ corp.proxy.port: {squid} }}
  prod: {{ corp.proxy.port: {prod} }}
upstream_proxies:
  corporate:
    description: squid with basic auth
    type: http
    host: 127.0.0.1
    port: ${{corp.proxy.port}}
    auth: {{ type: basic, user: {PROXY_USER}, password: "${{env:CORP_PROXY_PASSWORD}}" }}
  wrongpw:                # the same squid at the same address, with a wrong password
    type: http
    host: 127.0.0.1
    port: {squid}
    auth: {{ type: basic, user: {PROXY_USER}, password: not-the-password }}
  tls-corp:
    type: https
    host: localhost
    port: {stunnel}
    auth: {{ type: basic, user: {PROXY_USER}, password: "${{env:CORP_PROXY_PASSWORD}}" }}
    tls: {{ ca_file: "{ca}" }}
  dead:
    type: http
    host: 127.0.0.1
    port: {dead}
credentials:
  k: {{ type: bearer, token: "${{env:TARGET_SECRET}}" }}
targets:
  http-via:   {{ base_url: "http://127.0.0.1:{echo}", credential: k, upstream_proxy: corporate }}
  https-via:  {{ base_url: "https://localhost:{tls_echo}", credential: k, upstream_proxy: corporate, tls: {{ ca_file: "{ca}" }} }}
  tls-proxy:  {{ base_url: "https://localhost:{tls_echo}", credential: k, upstream_proxy: tls-corp, tls: {{ ca_file: "{ca}" }} }}
  wrong-http: {{ base_url: "http://127.0.0.1:{echo}", credential: k, upstream_proxy: wrongpw }}
  wrong-https: {{ base_url: "https://localhost:{tls_echo}", credential: k, upstream_proxy: wrongpw }}
  dead-proxy: {{ base_url: "http://127.0.0.1:{echo}", credential: k, upstream_proxy: dead }}
  gone-via:   {{ base_url: "http://127.0.0.1:{gone}", credential: k, upstream_proxy: corporate }}
  direct:     {{ base_url: "http://127.0.0.1:{echo}", credential: k }}
proxies:
  http-via: {{ target: http-via, tokens: {tok} }}
"""


PROXIES = [
    "https-via",
    "tls-proxy",
    "wrong-http",
    "wrong-https",
    "dead-proxy",
    "gone-via",
    "direct",
]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("upstream")
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    echo = start_echo_target(tmp)
    tls_echo = start_echo_target(tmp, tmp / "server.pem", tmp / "server.pem")
    squid = start_squid(PROXY_USER, PROXY_PASSWORD)
    stunnel = start_stunnel(tmp, tmp / "server.pem", squid.port)
    token = new_token()
    gone = free_port()  # nothing listens: squid cannot connect to it
    text = config(echo.port, tls_echo.port, squid.port, stunnel.port, tmp / "ca.pem", token, gone)
    text = text.replace("tokens: [", "tokens: [").rstrip("\n") + "\n"
    # every proxy shares the one token: each test names its route
    for name in PROXIES:
        text += f"  {name}: {{ target: {name}, tokens: [{{ id: t, sha256: {digest(token_for(token, name))} }}] }}\n"
    path = tmp / "keyswap.yaml"
    path.write_text(text)
    env = {"CORP_PROXY_PASSWORD": PROXY_PASSWORD, "TARGET_SECRET": TARGET_SECRET}
    stream = tmp / "flows.mitm"
    gateway = start_gateway(path, tmp, extra=["--set", f"save_stream_file={stream}"], env=env)
    yield Net(gateway, squid, stunnel, echo, tls_echo, token, tmp, text, gone)
    for p in (gateway, stunnel, squid, echo, tls_echo):
        p.stop()


def call(net: Net, proxy: str, path: str = "/x") -> httpx.Response:
    token = net.token if proxy == "http-via" else token_for(net.token, proxy)
    return httpx.get(
        f"{net.gateway.url}/api/{proxy}{path}", headers={"x-proxy-token": token}, timeout=30
    )


def squid_lines(net: Net, pattern: str) -> list[str]:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        lines = [line for line in net.squid.access_log().splitlines() if re.search(pattern, line)]
        if lines:
            return lines
        time.sleep(0.1)
    return []


def test_http_target_goes_through_squid_in_absolute_form(net: Net) -> None:
    r = call(net, "http-via", "/through-squid")
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["authorization"] == f"Bearer {TARGET_SECRET}"
    assert "proxy-authorization" not in seen  # squid consumed it
    assert "squid" in seen.get("via", "")
    lines = squid_lines(net, r"GET http://127\.0\.0\.1:\d+/through-squid")
    assert lines and f" {PROXY_USER} " in lines[0] and "TCP_MISS/200" in lines[0]


def test_https_target_goes_through_a_connect_tunnel(net: Net) -> None:
    r = call(net, "https-via", "/secure-through-squid")
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["authorization"] == f"Bearer {TARGET_SECRET}"
    lines = squid_lines(net, rf"CONNECT localhost:{net.tls_echo.port}")
    assert lines and f" {PROXY_USER} " in lines[0]


def test_https_proxy_with_its_own_ca(net: Net) -> None:
    r = call(net, "tls-proxy", "/via-stunnel")
    assert r.status_code == 200, r.text
    assert squid_lines(net, rf"CONNECT localhost:{net.tls_echo.port}")


def test_direct_target_in_the_same_gateway_does_not_touch_squid(net: Net) -> None:
    r = call(net, "direct", "/direct-only-marker")
    assert r.status_code == 200
    assert "via" not in r.json()["headers"]
    time.sleep(0.5)
    assert "direct-only-marker" not in net.squid.access_log()


def test_proxied_and_direct_connections_are_not_mixed_up(net: Net) -> None:
    # One client connection, alternating targets: each request keeps its own route.
    with httpx.Client(base_url=net.gateway.url, timeout=30) as client:
        for i in range(3):
            via = client.get(f"/api/http-via/mix-via-{i}", headers={"x-proxy-token": net.token})
            direct = client.get(
                f"/api/direct/mix-direct-{i}",
                headers={"x-proxy-token": token_for(net.token, "direct")},
            )
            assert "via" in via.json()["headers"] and "via" not in direct.json()["headers"]
    time.sleep(0.5)
    log = net.squid.access_log()
    assert all(f"mix-via-{i}" in log for i in range(3))
    assert "mix-direct" not in log


def proxy_error(r: httpx.Response, *phrases: str) -> None:
    assert r.status_code == 502, r.text
    assert r.headers["keyswap-proxy-code"] == "proxy-error"
    detail = r.json()["detail"]
    for phrase in phrases:
        assert phrase in detail, detail
    assert PROXY_PASSWORD not in r.text and "not-the-password" not in r.text


def no_address(text: str, *ports: int) -> None:
    assert "127.0.0.1" not in text and "localhost" not in text, text
    for port in ports:
        assert str(port) not in text, text


def test_wrong_password_http(net: Net) -> None:
    r = call(net, "wrong-http")
    proxy_error(r, "upstream proxy 'wrongpw'", "refused authentication (407)")
    no_address(r.json()["detail"], net.squid.port, net.echo.port)


def test_wrong_password_https(net: Net) -> None:
    r = call(net, "wrong-https")
    proxy_error(r, "upstream proxy 'wrongpw'", "refused the tunnel (CONNECT answered 407)")
    no_address(r.json()["detail"], net.squid.port, net.tls_echo.port)


def test_proxy_down_never_falls_back_to_direct(net: Net) -> None:
    r = call(net, "dead-proxy", "/must-not-arrive")
    proxy_error(r, "upstream proxy 'dead'", "upstream proxy unreachable (connection refused)")
    assert r.json()["type"] == "urn:keyswap:problem:upstream-proxy"
    no_address(r.json()["detail"], net.echo.port)


def test_two_proxies_at_one_address_with_different_credentials(net: Net) -> None:
    # `corporate` and `wrongpw` are the same squid (127.0.0.1, same port) with other
    # credentials: two connections, never one. Interleaved on one client connection,
    # in both orders, for absolute form (http) and CONNECT tunnels (https).
    conn = http.client.HTTPConnection("127.0.0.1", net.gateway.port, timeout=30)
    local = set()

    def get(proxy: str, path: str) -> tuple[int, bytes]:
        token = net.token if proxy == "http-via" else token_for(net.token, proxy)
        conn.request("GET", f"/api/{proxy}{path}", headers={"x-proxy-token": token})
        response = conn.getresponse()
        body = response.read()
        assert conn.sock is not None, "the gateway closed the client connection"
        local.add(conn.sock.getsockname())
        return response.status, body

    try:
        for i in range(2):
            for right, wrong in (("https-via", "wrong-https"), ("http-via", "wrong-http")):
                for proxy in (right, wrong) if i == 0 else (wrong, right):
                    status, body = get(proxy, f"/shared-{proxy}-{i}")
                    if proxy == right:
                        assert status == 200, body
                        assert json.loads(body)["headers"]["authorization"].endswith(TARGET_SECRET)
                    else:
                        assert status == 502, body
                        problem = json.loads(body)
                        assert problem["type"] == "urn:keyswap:problem:upstream-proxy"
                        assert "upstream proxy 'wrongpw'" in problem["detail"]
                        assert "407" in problem["detail"]
    finally:
        conn.close()
    assert len(local) == 1, f"more than one client connection: {local}"
    # squid saw each tunnel's CONNECT with the credentials of its own proxy
    connects = squid_lines(net, rf"CONNECT localhost:{net.tls_echo.port}")
    assert any(f" {PROXY_USER} " in line and "/200 " in line for line in connects)
    assert any("/407 " in line for line in connects)


def test_proxy_own_error_for_an_unreachable_http_target(net: Net) -> None:
    # squid answers 503 itself (X-Squid-Error: ERR_CONNECT_FAIL): that is no answer
    # from the target, so the client gets a gateway 502 naming the upstream proxy.
    r = call(net, "gone-via", "/nobody-home")
    proxy_error(
        r,
        "target 'gone-via' via upstream proxy 'corporate' failed:",
        "upstream proxy answered 503 itself (ERR_CONNECT_FAIL",
    )
    assert r.json()["type"] == "urn:keyswap:problem:upstream-proxy"
    assert r.headers["keyswap-proxy-message"] == r.json()["detail"]
    assert "x-squid-error" not in r.headers
    no_address(r.text + r.headers["keyswap-proxy-message"], net.gone, net.squid.port)


def test_target_own_503_through_the_proxy_stays_the_target_s(net: Net) -> None:
    r = call(net, "http-via", "/status/503")
    assert r.status_code == 503
    assert r.headers["keyswap-proxy-code"] == "proxy-access-granted"
    assert r.json() == {"status": 503}


def test_params_pick_the_proxy_per_environment(net: Net) -> None:
    gateway = start_gateway(
        net.gateway.config,
        net.tmp,
        env={
            "KS_ENV": "prod",
            "CORP_PROXY_PASSWORD": PROXY_PASSWORD,
            "TARGET_SECRET": TARGET_SECRET,
        },
    )
    try:
        r = httpx.get(
            f"{gateway.url}/api/http-via/prod-marker",
            headers={"x-proxy-token": net.token},
            timeout=30,
        )
        proxy_error(r, "upstream proxy 'corporate'")  # prod's proxy port has nothing on it
    finally:
        gateway.stop()
    assert "prod-marker" not in net.squid.access_log()


def test_proxy_password_never_leaves(net: Net) -> None:
    # A gateway of its own whose dump holds only non-reflecting calls (the echo
    # target would show the target credential in its body, by design).
    stream = net.tmp / "secrets.mitm"
    env = {"CORP_PROXY_PASSWORD": PROXY_PASSWORD, "TARGET_SECRET": TARGET_SECRET}
    gateway = start_gateway(
        net.gateway.config, net.tmp, extra=["--set", f"save_stream_file={stream}"], env=env
    )
    try:
        for proxy in (
            "http-via",
            "https-via",
            "tls-proxy",
            "wrong-http",
            "wrong-https",
            "dead-proxy",
        ):
            token = net.token if proxy == "http-via" else token_for(net.token, proxy)
            r = httpx.get(
                f"{gateway.url}/api/{proxy}/status/204",
                headers={"x-proxy-token": token},
                timeout=30,
            )
            assert r.status_code in (204, 502)
            assert PROXY_PASSWORD not in r.text and TARGET_SECRET not in r.text
    finally:
        gateway.stop()
    dump = stream.read_bytes()
    output = gateway.output()
    assert dump.count(b"8:response;") >= 6
    encoded = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode())
    for secret in (PROXY_PASSWORD.encode(), b"not-the-password", TARGET_SECRET.encode(), encoded):
        assert secret not in dump
        assert secret.decode() not in output


def run_test_upstream(net: Net, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORP_PROXY_PASSWORD": PROXY_PASSWORD, "TARGET_SECRET": TARGET_SECRET}
    cmd = [str(BIN / "keyswap"), "test-upstream", *args, "--config", str(net.gateway.config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize(
    ("name", "url", "steps"),
    [
        (
            "corporate",
            None,
            ["TCP to the proxy", "proxy authentication", "response from the far side"],
        ),
        (
            "corporate",
            "https-target",
            ["proxy authentication", "TLS to localhost", "HTTP/1.0 200|HTTP/1.1 200"],
        ),
        ("tls-corp", None, ["TLS to the proxy", "proxy authentication", "TLS to localhost"]),
    ],
)
def test_test_upstream_succeeds(net: Net, name: str, url: str | None, steps: list[str]) -> None:
    args = [name] if url is None else [name, "--url", f"https://localhost:{net.tls_echo.port}/"]
    done = run_test_upstream(net, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("success")
    for step in steps:
        assert re.search(step, done.stdout), step
    assert PROXY_PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("name", "failed_step"),
    [("wrongpw", "proxy authentication"), ("dead", "TCP to the proxy")],
)
def test_test_upstream_names_the_failing_step(net: Net, name: str, failed_step: str) -> None:
    done = run_test_upstream(net, name)
    assert done.returncode == 1
    assert f"FAILED {failed_step}" in done.stdout
    assert f"failed at: {failed_step}" in done.stderr
    assert "not-the-password" not in done.stdout + done.stderr
