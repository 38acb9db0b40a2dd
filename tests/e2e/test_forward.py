"""End to end, forward (intercepting) mode: a real gateway with a `regular` listener,
HTTPS targets with certificates of their own (trustme), and real clients behind
`HTTPS_PROXY`: curl, httpx, requests, the openai SDK, Node; squid between keyswap and
a target; a passthrough host keyswap never looks into.

The targets listen on loopback under names that resolve without DNS (`localhost`,
127.0.0.x). The openai SDK is pointed at its fake with `OPENAI_BASE_URL`, the way a
user points it at a regional endpoint: its origin is a target's like api.openai.com's
would be, and the SDK's own transport (httpx, `HTTPS_PROXY`, the CA) is what is tested."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from keyswap.config.tokens import digest, new_token
from tests.support import token_for
from tests.support.flaky_target import FlakyTarget
from tests.support.processes import BIN, GATEWAY_SCRIPT, Process, free_port, start
from tests.support.proxies import Squid, have_squid, start_squid

pytestmark = pytest.mark.e2e

SECRETS = {
    "header": "fwd-header-secret-7c1e55",
    "bearer": "fwd-bearer-secret-a90b21",
    "openai": "sk-fwd-openai-secret-3d4e5f",
    "query": "fwd-query-secret-0f0e0d",
    "corp": "fwd-corp-secret-778899",
}
PROXY_USER, PROXY_PASSWORD = "fwd-svc", "fwd-squid-pw-445566"
ENV = {
    "FWD_HEADER": SECRETS["header"],
    "FWD_BEARER": SECRETS["bearer"],
    "FWD_OPENAI": SECRETS["openai"],
    "FWD_QUERY": SECRETS["query"],
    "FWD_CORP": SECRETS["corp"],
    "FWD_SQUID_PW": PROXY_PASSWORD,
}
PROXIES = ("api", "bearer", "openai", "plain", "corp")


@dataclass
class World:
    gateway: Process
    forward: str  # http://127.0.0.1:PORT, the forward listener
    ca_cert: Path  # keyswap's CA: what clients trust
    target_ca: Path  # the targets' own CA (trustme)
    tls: FlakyTarget  # https://localhost:P and https://127.0.0.1:P
    plain: FlakyTarget  # http://127.0.0.1:Q
    corp: FlakyTarget | None  # https://127.0.0.1:R, behind squid
    passthrough: FlakyTarget  # https://127.0.0.2:S, never intercepted
    squid: Squid | None
    tokens: dict[str, str]
    db: Path
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        """What `keyswap run` sets, for a client started here."""
        ca = str(self.ca_cert)
        return {
            **os.environ,
            "HTTPS_PROXY": self.forward,
            "HTTP_PROXY": self.forward,
            "NO_PROXY": "",
            "no_proxy": "",
            "SSL_CERT_FILE": ca,
            "REQUESTS_CA_BUNDLE": ca,
            "NODE_EXTRA_CA_CERTS": ca,
            "NODE_USE_ENV_PROXY": "1",
            **extra,
        }

    def curl(
        self, url: str, *args: str, cacert: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            "curl",
            "-sS",
            "-m",
            "20",
            "--proxy",
            self.forward,
            "--cacert",
            str(cacert or self.ca_cert),
        ]
        cmd += ["-w", "\n%{http_code}", url, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def rows(self, where: str = "1") -> list[dict[str, object]]:
        """The activity log's rows that match, once there is one (rows are batched)."""
        deadline = time.monotonic() + 10
        while True:
            with closing(sqlite3.connect(self.db)) as conn:
                conn.row_factory = sqlite3.Row
                found = [dict(r) for r in conn.execute(f"select * from requests where {where}")]  # noqa: S608
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def config_text(
    world_ports: dict[str, int], tokens: dict[str, str], target_ca: Path, squid: int | None
) -> str:
    def tok(name: str) -> str:
        return f"[{{ id: t, sha256: {digest(tokens[name])} }}]"

    tls = f"{{ ca_file: {target_ca} }}"
    p, q = world_ports["tls"], world_ports["plain"]
    corp = ""
    if squid is not None:
        corp = f"""
  corp:   {{ base_url: "https://127.0.0.1:{world_ports["corp"]}", credential: corp, tls: {tls},
            upstream_proxy: squid }}"""
    return f"""\
version: 1
upstream_proxies:
  squid: {{ type: http, host: 127.0.0.1, port: {squid or 9},
           auth: {{ type: basic, user: {PROXY_USER}, password: "${{env:FWD_SQUID_PW}}" }} }}
credentials:
  header: {{ type: header, name: x-api-key, value: "${{env:FWD_HEADER}}" }}
  bearer: {{ type: bearer, token: "${{env:FWD_BEARER}}" }}
  openai: {{ type: bearer, token: "${{env:FWD_OPENAI}}" }}
  query:  {{ type: query, name: key, value: "${{env:FWD_QUERY}}" }}
  corp:   {{ type: bearer, token: "${{env:FWD_CORP}}" }}
targets:
  api:    {{ base_url: "https://localhost:{p}", credential: header, tls: {tls} }}
  bearer: {{ base_url: "https://127.0.0.1:{p}", credential: bearer, tls: {tls} }}
  openai: {{ base_url: "https://localhost:{p}/v1", credential: openai, tls: {tls} }}
  plain:  {{ base_url: "http://127.0.0.1:{q}", credential: query }}{corp}
proxies:
  api:    {{ target: api, tokens: {tok("api")}, rules: [{{ deny: {{ path: /admin/** }} }}] }}
  bearer: {{ target: bearer, tokens: {tok("bearer")} }}
  openai: {{ target: openai, template: openai, tokens: {tok("openai")} }}
  plain:  {{ target: plain, tokens: {tok("plain")} }}
  corp:   {{ target: {"corp" if squid else "bearer"}, tokens: {tok("corp")}, active: {squid is not None} }}
forward:
  passthrough: [127.0.0.2]
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("forward")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "127.0.0.2")
    ca.cert_pem.write_to_path(str(tmp / "target-ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    tls = FlakyTarget(default="echo", tls=server)
    plain = FlakyTarget(default="echo")
    passthrough = FlakyTarget(default="echo", host="127.0.0.2", tls=server)
    squid = start_squid(PROXY_USER, PROXY_PASSWORD) if have_squid() else None
    corp = FlakyTarget(default="echo", tls=server) if squid else None
    tokens = {name: new_token() for name in PROXIES}
    ports = {"tls": tls.port, "plain": plain.port, "corp": corp.port if corp else 0}
    config = tmp / "keyswap.yaml"
    config.write_text(
        config_text(ports, tokens, tmp / "target-ca.pem", squid.port if squid else None)
    )
    port = free_port()
    db = tmp / "keyswap.db"
    cmd = [
        str(BIN / "mitmdump"), "-s", str(GATEWAY_SCRIPT),
        "--mode", f"regular@127.0.0.1:{port}",
        "--set", f"confdir={tmp / 'keyswap-ca'}",
        "--set", f"keyswap_config={config}", "--set", f"keyswap_db={db}",
        "--set", "flow_detail=3",  # everything mitmproxy shows goes to the output
        "--set", f"save_stream_file={tmp / 'flows.mitm'}",  # and every flow is saved
    ]  # fmt: skip
    gateway = start(cmd, port, tmp / "gateway.log", ENV)
    yield World(
        gateway,
        f"http://127.0.0.1:{port}",
        tmp / "keyswap-ca" / "mitmproxy-ca-cert.pem",
        tmp / "target-ca.pem",
        tls,
        plain,
        corp,
        passthrough,
        squid,
        tokens,
        db,
        tmp,
    )
    gateway.stop()
    for target in (tls, plain, passthrough, corp):
        if target is not None:
            target.close()
    if squid is not None:
        squid.stop()


def body_and_status(result: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    body, _, status = result.stdout.rpartition("\n")
    return body, int(status or 0)


def echoed(body: str) -> dict[str, str]:
    """The request headers the target echoed back, names in lower case."""
    return {k.lower(): v for k, v in json.loads(body).items()}


def last_arrival(target: FlakyTarget, since: int) -> dict[str, str]:
    arrivals = target.arrivals[since:]
    assert len(arrivals) == 1, [a.path for a in arrivals]
    return arrivals[0].headers


def no_token(headers: dict[str, str], world: World) -> None:
    text = json.dumps(headers)
    assert "ks_" not in text
    assert all(token not in text for token in world.tokens.values())


# --- clients ----------------------------------------------------------------------


def test_curl_with_the_token_where_the_api_expects_its_key(world: World) -> None:
    before = len(world.tls.arrivals)
    result = world.curl(
        f"https://localhost:{world.tls.port}/v2/items?limit=3",
        "-H",
        f"x-api-key: {world.tokens['api']}",
    )
    body, status = body_and_status(result)
    assert status == 200, result
    seen = last_arrival(world.tls, before)
    assert seen["x-api-key"] == SECRETS["header"]  # the target got the real key
    assert seen["host"] == f"localhost:{world.tls.port}"
    no_token(seen, world)
    assert world.tls.arrivals[-1].path == "/v2/items?limit=3"
    # The target echoed the key; the program sees it masked.
    assert SECRETS["header"] not in body and echoed(body)["x-api-key"] == "********"
    # curl spoke HTTP/2 to keyswap inside the tunnel (the target speaks HTTP/1.1)
    http2 = world.curl(
        f"https://localhost:{world.tls.port}/h2",
        "-H",
        f"x-proxy-token: {world.tokens['api']}",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
    )
    assert http2.stdout == "2 200", http2
    row = world.rows("proxy_id = 'api' and path like '%/v2/items%'")[-1]
    assert row["mode"] == "forward" and row["proxy_code"] == "proxy-access-granted"
    assert row["path"] == f"https://localhost:{world.tls.port}/v2/items?limit=3"


def test_python_httpx_and_requests_with_https_proxy_from_the_environment(world: World) -> None:
    url = f"https://127.0.0.1:{world.tls.port}/things"
    program = f"""
import httpx, requests, sys
token = sys.argv[1]
a = httpx.get({url!r}, headers={{"authorization": "Bearer " + token}})
b = requests.get({url!r}, headers={{"authorization": "Bearer " + token}})
print(a.status_code, b.status_code, a.headers["keyswap-proxy-code"])
"""
    before = len(world.tls.arrivals)
    out = subprocess.run(
        [sys.executable, "-c", program, world.tokens["bearer"]],
        env=world.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.split() == ["200", "200", "proxy-access-granted"], out.stderr
    for arrival in world.tls.arrivals[before:]:
        assert arrival.headers["authorization"] == f"Bearer {SECRETS['bearer']}"
        no_token(arrival.headers, world)
    assert len(world.tls.arrivals) - before == 2


def test_the_openai_sdk_with_its_api_key_set_to_the_token(world: World) -> None:
    program = """
import openai
client = openai.OpenAI()
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
)
print(raw.http_response.status_code, raw.http_response.headers["keyswap-proxy-code"])
"""
    before = len(world.tls.arrivals)
    env = world.env(
        OPENAI_API_KEY=world.tokens["openai"],
        OPENAI_BASE_URL=f"https://localhost:{world.tls.port}/v1",
    )
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["200", "proxy-access-granted"], out.stderr
    arrival = world.tls.arrivals[before]
    assert arrival.path == "/v1/chat/completions" and arrival.method == "POST"
    assert arrival.headers["authorization"] == f"Bearer {SECRETS['openai']}"
    assert b"gpt-4o-mini" in arrival.body
    no_token(arrival.headers, world)


def node_has_env_proxy() -> bool:
    """NODE_USE_ENV_PROXY: Node 24, and 22 from 22.21."""
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    return major >= 24 or (major == 22 and minor >= 21)


NODE_CONNECT = """
// Node before 22.21 has no NODE_USE_ENV_PROXY: a CONNECT tunnel by hand, as its docs show.
const http = require("http"), https = require("https");
const proxy = new URL(process.env.HTTPS_PROXY), target = new URL(process.argv[1]);
http.request({host: proxy.hostname, port: proxy.port, method: "CONNECT",
              path: `${target.hostname}:${target.port}`}).on("connect", (res, socket) => {
  https.get({host: target.hostname, port: target.port, path: target.pathname, socket,
             servername: target.hostname, agent: false,
             headers: {authorization: "Bearer " + process.argv[2]}}, (r) => {
    console.log(r.statusCode, r.headers["keyswap-proxy-code"]); r.resume();
  });
}).end();
"""
NODE_FETCH = """
fetch(process.argv[1], {headers: {authorization: "Bearer " + process.argv[2]}})
  .then((r) => console.log(r.status, r.headers.get("keyswap-proxy-code")));
"""


@pytest.mark.skipif(
    subprocess.run(["which", "node"], capture_output=True).returncode != 0,
    reason="node is not installed",
)
def test_node_trusts_the_ca_from_node_extra_ca_certs(world: World) -> None:
    program = NODE_FETCH if node_has_env_proxy() else NODE_CONNECT
    before = len(world.tls.arrivals)
    url = f"https://127.0.0.1:{world.tls.port}/node"
    out = subprocess.run(
        ["node", "-e", program, url, world.tokens["bearer"]],
        env=world.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.split() == ["200", "proxy-access-granted"], out.stderr
    assert world.tls.arrivals[before].headers["authorization"] == f"Bearer {SECRETS['bearer']}"


def test_plain_http_proxy_request_with_the_token_in_the_query(world: World) -> None:
    before = len(world.plain.arrivals)
    url = f"http://127.0.0.1:{world.plain.port}/search?q=1&key={world.tokens['plain']}"
    result = world.curl(url)
    assert body_and_status(result)[1] == 200, result
    arrival = world.plain.arrivals[before]
    assert arrival.path == f"/search?q=1&key={SECRETS['query']}"
    no_token(arrival.headers, world)


@pytest.mark.skipif(not have_squid(), reason="squid is needed (.ci/run installs it)")
def test_a_target_behind_squid_is_reached_through_it(world: World) -> None:
    assert world.corp is not None and world.squid is not None
    before = len(world.corp.arrivals)
    url = f"https://127.0.0.1:{world.corp.port}/corp"
    result = world.curl(url, "-H", f"authorization: Bearer {world.tokens['corp']}")
    assert body_and_status(result)[1] == 200, result
    assert world.corp.arrivals[before].headers["authorization"] == f"Bearer {SECRETS['corp']}"
    deadline = time.monotonic() + 10
    while f"CONNECT 127.0.0.1:{world.corp.port}" not in world.squid.access_log():
        assert time.monotonic() < deadline, world.squid.access_log()
        time.sleep(0.2)
    assert PROXY_USER in world.squid.access_log()


# --- what is refused --------------------------------------------------------------

REFUSALS = [
    # (what, how to send it, status, problem code)
    ("a wrong token", "wrong", 401, "wrong-token"),
    ("no token", "none", 401, "missing-token"),
    ("a token of a proxy for another origin", "other-proxy", 403, "host"),
    ("a Host header naming another origin", "host", 403, "host"),
    ("a TLS server name other than the tunnel's", "sni", 403, "host"),
    ("the real key, sent by the program", "secret", 403, "secret-in-request"),
    ("a path its proxy's rules deny", "rule", 403, "rule"),
]


@pytest.mark.parametrize(("what", "how", "status", "code"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_refused_requests_reach_no_target(
    world: World, what: str, how: str, status: int, code: str
) -> None:
    port = world.tls.port
    url, args = f"https://localhost:{port}/x", ["-H", f"x-api-key: {world.tokens['api']}"]
    if how == "wrong":
        args = ["-H", f"x-api-key: {token_for(world.tokens['api'], 'nope')}"]
    elif how == "none":
        args = []
    elif how == "other-proxy":
        args = ["-H", f"authorization: Bearer {world.tokens['bearer']}"]
    elif how == "host":
        args += ["-H", f"Host: 127.0.0.1:{port}", "--http1.1"]
    elif how == "sni":  # the tunnel goes to 127.0.0.1, the TLS handshake names localhost
        args = [
            "-H",
            f"authorization: Bearer {world.tokens['bearer']}",
            "--connect-to",
            f"localhost:{port}:127.0.0.1:{port}",
        ]
    elif how == "secret":
        args += ["-H", f"x-debug: {SECRETS['bearer']}"]
    elif how == "rule":
        url = f"https://localhost:{port}/admin/users"
    before = len(world.tls.arrivals)
    body, got = body_and_status(world.curl(url, *args))
    assert got == status, (what, body)
    problem = json.loads(body)
    assert problem["error"]["code"] == code, (what, problem)
    assert len(world.tls.arrivals) == before, f"{what} reached the target"


def tunnel(world: World, authority: str) -> socket.socket:
    """A raw connection to the forward listener, through an open CONNECT tunnel."""
    raw = socket.create_connection(("127.0.0.1", int(world.forward.rsplit(":", 1)[1])), timeout=10)
    raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert raw.recv(1024).startswith(b"HTTP/1.1 200")
    return raw


def test_bytes_in_an_intercepted_tunnel_never_pass_as_raw_tcp(world: World) -> None:
    # mitmproxy passes a first read that does not look like HTTP (`GET` alone) on as raw
    # TCP when `rawtcp` is on: the rest of the request would then skip every check.
    before = len(world.plain.arrivals)
    with tunnel(world, f"127.0.0.1:{world.plain.port}") as raw:
        raw.sendall(b"GET")
        time.sleep(0.3)
        raw.sendall(
            f" /x HTTP/1.1\r\nHost: 127.0.0.1:{world.plain.port}\r\n"
            f"x-api-key: {SECRETS['query']}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"secret-in-request" in answer
    with tunnel(world, f"127.0.0.1:{world.plain.port}") as raw:
        raw.sendall(b"\x00\x01not http at all\r\n\r\n")
        raw.settimeout(5)
        with contextlib.suppress(OSError):
            raw.recv(65536)
    assert len(world.plain.arrivals) == before


def test_a_host_that_is_not_a_target_is_refused_at_connect(world: World) -> None:
    result = world.curl(f"https://127.0.0.3:{world.tls.port}/", "-v")
    assert "CONNECT tunnel failed, response 403" in result.stderr
    row = world.rows("method = 'CONNECT' and status = 403")[-1]
    assert row["path"] == f"127.0.0.3:{world.tls.port}" and row["mode"] == "forward"
    # Plain HTTP to a non-target: refused too, and a real secret in it first of all.
    body, status = body_and_status(world.curl("http://127.0.0.3:9/"))
    assert status == 403 and json.loads(body)["error"]["code"] == "not-a-target"
    body, status = body_and_status(
        world.curl("http://127.0.0.3:9/", "-H", f"x-leak: {SECRETS['header']}")
    )
    assert status == 403 and json.loads(body)["error"]["code"] == "secret-in-request"


def test_a_passthrough_host_is_tunnelled_untouched_with_its_own_certificate(world: World) -> None:
    target = world.passthrough
    before = len(target.arrivals)
    # Trusting only the target's own CA: keyswap's certificate would fail the handshake.
    result = world.curl(
        f"https://127.0.0.2:{target.port}/pkg",
        "-H",
        "x-api-key: the-programs-own",
        cacert=world.target_ca,
    )
    assert body_and_status(result)[1] == 200, result
    assert "keyswap-proxy-code" not in result.stdout
    headers = target.arrivals[before].headers
    assert headers["x-api-key"] == "the-programs-own"  # not swapped, not masked
    # The certificate the client saw is the target's, not one keyswap made.
    with socket.create_connection(("127.0.0.1", int(world.forward.rsplit(":", 1)[1]))) as raw:
        raw.sendall(
            f"CONNECT 127.0.0.2:{target.port} HTTP/1.1\r\nHost: 127.0.0.2:{target.port}\r\n\r\n".encode()
        )
        assert raw.recv(1024).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(world.target_ca))
        with context.wrap_socket(raw, server_hostname="127.0.0.2") as tls:
            issuer = dict(x[0] for x in tls.getpeercert()["issuer"])  # type: ignore[index]
    assert "trustme" in issuer["organizationName"]
    row = world.rows(f"method = 'CONNECT' and path = '127.0.0.2:{target.port}'")[-1]
    assert row["status"] == 200 and row["mode"] == "forward"
    assert row["message"] == "tunnelled untouched (forward.passthrough)"


@pytest.mark.parametrize("http", ["--http2", "--http1.1"])
@pytest.mark.parametrize("step", ["echo-gzip", "echo-chunked", "echo-gzip-chunked"])
def test_an_echoed_secret_comes_back_masked_compressed_or_streamed(
    world: World, step: str, http: str
) -> None:
    world.tls.script.append(step)
    before = len(world.tls.arrivals)
    result = world.curl(
        f"https://localhost:{world.tls.port}/echo",
        http,
        "--compressed",
        "-H",
        f"x-api-key: {world.tokens['api']}",
    )
    body, status = body_and_status(result)
    assert status == 200 and world.tls.arrivals[before].step == step
    assert SECRETS["header"] not in body
    assert echoed(body)["x-api-key"] == "********"


def test_no_secret_or_token_in_the_log_the_database_or_the_output(world: World) -> None:
    # after the tests above (module order): every secret went to a target, some echoed
    assert world.rows("mode = 'forward'")
    output = world.gateway.output()
    assert (world.tmp / "flows.mitm").stat().st_size > 0
    stored = b"".join(
        p.read_bytes() for p in [*world.tmp.glob("keyswap.db*"), world.tmp / "flows.mitm"]
    )
    for value in [*SECRETS.values(), PROXY_PASSWORD, *world.tokens.values()]:
        assert value not in output, value
        assert value.encode() not in stored, value
    assert not re.search(r"ks_[A-Za-z0-9_-]{43}", output)
