"""Hostile requests, sent as raw bytes (HTTP clients refuse to send most of them) to a
real gateway in front of a target that records every byte it receives. For each case:
what the client got, and what the target received (nothing, for a refused request)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import Gateway, start_gateway
from tests.support.raw_target import RawTarget, raw_target

pytestmark = pytest.mark.e2e

SECRET = "sk-hostile-target-5b1e2c"


@dataclass
class Stage:
    gateway: Gateway
    target: RawTarget
    token: str
    tracer: str
    header_token: str
    query_token: str
    db: Path

    @property
    def tokens(self) -> list[str]:
        return [self.token, self.tracer, self.header_token, self.query_token]


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    tmp = tmp_path_factory.mktemp("hostile")
    token, tracer, header_token, query_token = (new_token() for _ in range(4))
    with raw_target() as target:
        config = tmp / "keyswap.yaml"
        config.write_text(
            f"""\
version: 1
limits: {{ header_timeout_s: 1.5 }}
credentials:
  key: {{ type: bearer, token: "${{env:HOSTILE_SECRET}}" }}
  apikey: {{ type: header, name: x-api-key, value: "${{env:HOSTILE_SECRET}}" }}
  querykey: {{ type: query, name: key, value: "${{env:HOSTILE_SECRET}}" }}
targets:
  raw: {{ base_url: "http://127.0.0.1:{target.port}", credential: key }}
  rawheader: {{ base_url: "http://127.0.0.1:{target.port}", credential: apikey }}
  rawquery: {{ base_url: "http://127.0.0.1:{target.port}", credential: querykey }}
proxies:
  p:
    target: raw
    rules: [{{ deny: {{ path: /admin/** }} }}]
    tokens: [{{ id: t, sha256: {digest(token)} }}]
  tracing:
    target: raw
    methods: [GET, TRACE]
    tokens: [{{ id: t, sha256: {digest(tracer)} }}]
  sdkheader:
    target: rawheader
    tokens: [{{ id: t, sha256: {digest(header_token)} }}]
  sdkquery:
    target: rawquery
    tokens: [{{ id: t, sha256: {digest(query_token)} }}]
"""
        )
        db = tmp / "keyswap.db"
        gateway = start_gateway(config, tmp, env={"HOSTILE_SECRET": SECRET}, db=db)
        stage = Stage(gateway, target, token, tracer, header_token, query_token, db)
        try:
            yield stage
        finally:
            gateway.stop()
        output = gateway.output()
        assert "Traceback" not in output, output
        stored = b"".join(f.read_bytes() for f in tmp.glob("keyswap.db*"))
        for secret in [*stage.tokens, SECRET]:
            assert secret not in output, "a secret reached the gateway's output"
            assert secret.encode() not in stored, "a secret reached the state database"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(stage: Stage, data: bytes, timeout: float = 10) -> Answer:
    """Send raw bytes on a fresh connection; the answer to the first request."""
    with socket.create_connection(("127.0.0.1", stage.gateway.port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return Answer(int(lines[0].split()[1]), headers, body)


def request(stage: Stage, line: bytes, *headers: bytes, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token or stage.token}".encode()
    return b"\r\n".join([line, b"Host: gw", auth, *headers, b"Connection: close", b"", b""])


def refused(stage: Stage, data: bytes, status: int) -> Answer:
    stage.target.clear()
    answer = send(stage, data)
    assert answer.status == status, answer
    assert stage.target.everything == b"", "a refused request reached the target"
    if answer.headers.get("content-type") == "application/problem+json":
        assert answer.headers["keyswap-proxy-code"] == "proxy-access-denied"
        assert json.loads(answer.body)["status"] == status
    return answer


def forwarded(stage: Stage, data: bytes) -> bytes:
    stage.target.clear()
    answer = send(stage, data)
    assert answer.status == 200, answer
    assert answer.headers["keyswap-proxy-code"] == "proxy-access-granted"
    deadline = time.monotonic() + 5
    while not stage.target.everything and time.monotonic() < deadline:
        time.sleep(0.01)
    return stage.target.everything


MALFORMED = {
    "bare-cr-smuggles-te": (
        b"POST /api/p/x HTTP/1.1",
        b"X-A: a\rTransfer-Encoding: chunked",
        b"Content-Length: 0",
    ),
    "bare-cr-injects-xff": (b"GET /api/p/x HTTP/1.1", b"X-A: a\rX-Forwarded-For: 6.6.6.6"),
    "obs-fold": (b"GET /api/p/x HTTP/1.1", b"X-A: a", b" folded: b"),
    "nul-in-value": (b"GET /api/p/x HTTP/1.1", b"X-A: a\x00b"),
    "nul-in-path": (b"GET /api/p/a\x00b HTTP/1.1",),
    "tab-in-path": (b"GET /api/p/a\tb HTTP/1.1",),
    "del-in-path": (b"GET /api/p/a\x7fb HTTP/1.1",),
    "long-method": (b"G" * 1024 + b" /api/p/x HTTP/1.1",),
    "non-token-method": (b"G\xffT /api/p/x HTTP/1.1",),
    "esc-in-value": (b"GET /api/p/x HTTP/1.1", b"X-A: \x1b[31mred"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_are_refused_before_the_target(stage: Stage, name: str) -> None:
    refused(stage, request(stage, *MALFORMED[name]), 400)


@pytest.mark.parametrize("method", [b"TRACE", b"TRACK", b"trace"])
def test_trace_is_refused_unless_the_proxy_lists_it(stage: Stage, method: bytes) -> None:
    answer = refused(stage, request(stage, method + b" /api/p/x HTTP/1.1"), 405)
    assert "TRACE" not in answer.headers["allow"]
    if method == b"TRACE":
        line = b"TRACE /api/tracing/x HTTP/1.1"
        assert forwarded(stage, request(stage, line, token=stage.tracer)).startswith(b"TRACE /x ")


def test_limits_answer_414_and_431(stage: Stage) -> None:
    refused(stage, request(stage, b"GET /api/p/" + b"a" * 9000 + b" HTTP/1.1"), 414)
    refused(stage, request(stage, b"GET /api/p/x HTTP/1.1", b"X-Big: " + b"a" * 70_000), 431)
    many = [b"X-%d: v" % i for i in range(150)]
    refused(stage, request(stage, b"GET /api/p/x HTTP/1.1", *many), 431)
    # just under every limit still passes
    forwarded(stage, request(stage, b"GET /api/p/" + b"a" * 8000 + b" HTTP/1.1"))


@pytest.mark.parametrize(
    "path",
    [b"/ADMIN/x", b"/Admin/x", b"/admin;jsessionid=1/x", b"/admin%3b/x", b"/admin%3B/x",
     b"/admin%20/x", b"/admin./x", b"/admin%2e/x", b"/admin%252e/x", b"/admin", b"/admin.."],
)  # fmt: skip
def test_deny_rules_cannot_be_dodged_by_spelling(stage: Stage, path: bytes) -> None:
    answer = refused(stage, request(stage, b"GET /api/p" + path + b" HTTP/1.1"), 403)
    assert json.loads(answer.body)["type"] == "urn:keyswap:problem:rule"


@pytest.mark.parametrize("path", [b"/admin%09/x", b"/admin%00/x", b"/admin%2509/x", b"/admin%7f/x"])
def test_a_percent_encoded_control_character_is_refused(stage: Stage, path: bytes) -> None:
    # lenient backends trim `%09` or cut at `%00`: `/admin%09/x` would be `/admin/x`
    answer = refused(stage, request(stage, b"GET /api/p" + path + b" HTTP/1.1"), 400)
    assert "control character" in json.loads(answer.body)["detail"]


def test_connection_cannot_remove_the_host_header(stage: Stage) -> None:
    received = forwarded(stage, request(stage, b"GET /api/p/x HTTP/1.1", b"Connection: host"))
    head = received.split(b"\r\n\r\n")[0].lower()
    assert f"\r\nhost: 127.0.0.1:{stage.target.port}".encode() in head


def test_what_the_target_gets_is_the_credential_not_the_token(stage: Stage) -> None:
    received = forwarded(stage, request(stage, b"GET /api/p/x?a=1 HTTP/1.1", b"X-Ok: yes"))
    assert received.startswith(b"GET /x?a=1 HTTP/1.1\r\n")
    assert f"Bearer {SECRET}".encode() in received
    assert stage.token.encode() not in received


def log_rows(stage: Stage) -> list[dict[str, object]]:
    with closing(sqlite3.connect(stage.db)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from requests")]


def test_no_request_can_erase_other_log_rows(stage: Stage) -> None:
    """Bytes that are not UTF-8 in a logged field once failed the writer's whole batch."""
    poison = [
        request(stage, b"GET /api/p/x HTTP/1.1", b"User-Agent: \xff\xfe"),
        request(stage, b"GET /api/p/x HTTP/1.1", b"Origin: http://\xff.example"),
        request(stage, b"GET /api/p/x HTTP/1.1", b"X-Name-\xff: v"),
        request(stage, b"GET /unknown/\xc3\x28 HTTP/1.1", b"User-Agent: \xc3\x28"),
    ]
    time.sleep(1)  # rows of earlier tests are flushed (the writer lingers 0.25 s)
    before = len(log_rows(stage))
    ids = []
    for i in range(40):
        answer = send(
            stage, poison[(i // 2) % 4] if i % 2 else request(stage, b"GET /api/p/ok HTTP/1.1")
        )
        if "keyswap-request-id" in answer.headers:
            ids.append(answer.headers["keyswap-request-id"])
        else:  # mitmproxy's own refusal of a header name that is not a token
            assert answer.status == 400
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = {r["id"]: r for r in log_rows(stage)}
        if len(rows) >= before + 40 and set(ids) <= set(rows):
            break
        time.sleep(0.1)
    assert set(ids) <= set(rows), f"{len(set(ids) - set(rows))} of {len(ids)} rows lost"
    assert len(rows) == before + 40, "a request left no row"
    agents = {r["user_agent"] for r in rows.values()}
    assert "\\xff\\xfe" in agents  # shown, not lost
    health = send(stage, b"GET /_keyswap/health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert json.loads(health.body)["activity_log"]["write_failures"] == 0


def test_the_token_is_accepted_where_the_sdk_puts_its_key(stage: Stage) -> None:
    """An unmodified SDK given the token as its API key: the credential's header, its
    query parameter, or the password of Basic."""
    received = forwarded(
        stage,
        request(stage, b"GET /api/sdkheader/x HTTP/1.1", token="-").replace(
            b"Authorization: Bearer -\r\n", f"x-api-key: {stage.header_token}\r\n".encode()
        ),
    )
    assert f"x-api-key: {SECRET}".encode() in received and b"ks_" not in received
    line = f"GET /api/sdkquery/x?a=1&key={stage.query_token} HTTP/1.1".encode()
    received = forwarded(
        stage, request(stage, line, token="-").replace(b"Authorization: Bearer -\r\n", b"")
    )
    assert received.startswith(f"GET /x?a=1&key={SECRET} HTTP/1.1".encode())
    assert b"ks_" not in received
    basic = base64.b64encode(f"user:{stage.token}".encode())
    received = forwarded(
        stage,
        request(stage, b"GET /api/p/x HTTP/1.1", token="-").replace(
            b"Authorization: Bearer -", b"Authorization: Basic " + basic
        ),
    )
    assert f"Bearer {SECRET}".encode() in received and b"ks_" not in received


def test_a_token_is_never_forwarded_wherever_it_stands(stage: Stage) -> None:
    other = new_token()  # a token of no proxy, shaped like one
    received = forwarded(
        stage,
        request(
            stage,
            f"GET /api/p/x?token={stage.token}&a=1&t2={other} HTTP/1.1".encode(),
            f"api-key: {stage.token}".encode(),
            f"x-api-key: {stage.token}".encode(),
            f"Cookie: session={other}".encode(),
        ),
    )
    assert received.startswith(b"GET /x?a=1 HTTP/1.1\r\n")
    assert b"ks_" not in received
    refused(stage, request(stage, f"GET /api/p/{other}/x HTTP/1.1".encode()), 400)


def test_a_refused_request_records_no_token(stage: Stage) -> None:
    line = f"GET /api/p/x?token={stage.token} HTTP/1.1".encode()
    answer = refused(
        stage,
        request(stage, line, f"api-key: {stage.token}".encode(), token="ks_wrong"),
        401,
    )
    time.sleep(0.6)
    row = next(r for r in log_rows(stage) if r["id"] == answer.headers["keyswap-request-id"])
    assert stage.token not in json.dumps(row)
    assert "********" in str(row["path"])


def test_a_token_quoted_by_the_gateway_is_masked_everywhere(stage: Stage) -> None:
    """Refusals that quote the client (a header name, an origin), and a request line cut
    at the record's bound: the token is masked before anything is cut or shown."""
    token = stage.token
    named = refused(stage, request(stage, b"GET /api/p/x HTTP/1.1", f"{token}: 1".encode()), 400)
    lower = request(stage, b"GET /api/p/x HTTP/1.1", f"x-{token.lower()}: 1".encode())
    assert b"proxy token" in refused(stage, lower, 400).body
    origin = send(
        stage, request(stage, b"GET /api/p/x HTTP/1.1", f"Origin: http://{token}".encode())
    )
    long_line = f"GET /api/p/{'a' * 1000}{token}{'b' * 9000} HTTP/1.1".encode()
    cut = refused(stage, request(stage, long_line), 414)
    time.sleep(0.6)
    ids = {a.headers["keyswap-request-id"] for a in (named, origin, cut)}
    rows = [r for r in log_rows(stage) if r["id"] in ids]
    assert len(rows) == 3
    for answer in (named, origin, cut):
        assert token[3:20] not in repr(answer)
    assert token[3:20] not in json.dumps(rows), rows


def test_a_protocol_error_quoting_a_token_shows_it_masked(stage: Stage) -> None:
    """mitmproxy's own parse error quotes the bad line; the flow's error (shown by its
    dumper on stdout, by mitmweb and in saved flows) must not carry the token."""
    token = stage.token
    answer = send(stage, request(stage, b"GET /api/p/x HTTP/1.1", f"{token} : v".encode()))
    assert answer.status == 400
    time.sleep(0.6)
    assert token[3:20] not in stage.gateway.output()
    assert token[3:20] not in json.dumps(log_rows(stage))


def test_a_huge_head_is_cut_at_the_limit_and_memory_stays_flat(stage: Stage) -> None:
    """mitmproxy reads a head whole; the gate refuses it once it crosses the limit."""
    huge = request(stage, b"GET /api/p/x HTTP/1.1", b"X-Big: " + b"a" * (8 << 20))
    answer = refused(stage, huge, 431)  # read, not reset: the gate closes lingeringly
    assert answer.headers["connection"] == "close"
    before = stage.gateway.rss_kib()
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", stage.gateway.port), timeout=10) as s:
            with contextlib.suppress(OSError):
                s.sendall(huge)
                s.recv(65536)
    growth_mib = (stage.gateway.rss_kib() - before) / 1024
    assert growth_mib < 10, f"RSS grew {growth_mib:.1f} MiB after 30 heads of 8 MiB"
    assert stage.target.everything == b""


def test_a_refused_requests_huge_body_is_cut_off_and_memory_stays_flat(stage: Stage) -> None:
    """No token, a body of 10 GB declared, `Expect: 100-continue`: no 100 invites it,
    and what comes anyway is answered 401 and dropped after 64 KiB, not kept."""
    head = b"\r\n".join(
        [
            b"POST /api/p/x HTTP/1.1",
            b"Host: gw",
            b"Content-Length: 10000000000",
            b"Expect: 100-continue",
            b"",
            b"",
        ]
    )
    before = stage.gateway.rss_kib()
    with socket.create_connection(("127.0.0.1", stage.gateway.port), timeout=10) as s:
        s.sendall(head)
        s.settimeout(1)
        with contextlib.suppress(TimeoutError):
            assert not s.recv(100).startswith(b"HTTP/1.1 100")
        s.settimeout(10)
        with contextlib.suppress(OSError):
            for _ in range(1600):  # 100 MiB, as long as the gateway reads
                s.sendall(b"x" * 65536)
        with contextlib.suppress(OSError):
            assert s.recv(100).startswith(b"HTTP/1.1 401")
    growth_mib = (stage.gateway.rss_kib() - before) / 1024
    assert growth_mib < 20, f"RSS grew {growth_mib:.1f} MiB for a refused 100 MiB body"
    assert stage.target.everything == b""


def test_a_head_that_trickles_in_is_refused_408(stage: Stage) -> None:
    """Slowloris: each byte arrives in time for the idle timeout, the head never does."""
    stage.target.clear()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stage.gateway.port), timeout=10) as s:
        s.sendall(b"GET /api/p/x HTTP/1.1\r\nHost: gw\r\n")
        got = b""
        for _ in range(40):
            with contextlib.suppress(OSError):
                s.sendall(b"X")
            s.settimeout(0.25)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            got += chunk
            if not chunk or b"\r\n\r\n" in got:
                break
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert 1.4 < time.monotonic() - started < 5
    assert stage.target.everything == b""


def test_framing_keeps_bodies_and_pipelined_requests_apart(stage: Stage) -> None:
    """Bodies are bodies, not heads, for the head limits: a body full of CR LF and larger
    than any head limit, then a chunked one, then a request with no body, pipelined."""
    auth = f"Authorization: Bearer {stage.token}".encode()
    body = b"\r\n\r\nGET /evil HTTP/1.1\r\n\r\n" + b"b" * 200_000
    pipelined = b"".join(
        [
            b"POST /api/p/one HTTP/1.1\r\nHost: gw\r\n" + auth,
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
            b"POST /api/p/two HTTP/1.1\r\nHost: gw\r\n" + auth,
            b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"GET /api/p/three HTTP/1.1\r\nHost: gw\r\n" + auth + b"\r\nConnection: close\r\n\r\n",
        ]
    )
    stage.target.clear()
    got = exchange(stage, pipelined, answers=3)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == [b"200", b"200", b"200"], got[:500]
    deadline = time.monotonic() + 5
    while stage.target.everything.count(b" HTTP/1.1\r\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    received = stage.target.everything
    assert b"POST /one " in received and b"POST /two " in received and b"GET /three " in received
    assert b"GET /evil" in received  # inside the first body, as a body


def test_request_trailers_are_dropped(stage: Stage) -> None:
    """mitmproxy's HTTP/1 reader cannot take trailer fields (it raised
    NotImplementedError and the client got no answer): they are dropped."""
    auth = f"Authorization: Bearer {stage.token}".encode()
    data = (
        b"POST /api/p/x HTTP/1.1\r\nHost: gw\r\n" + auth + b"\r\nTransfer-Encoding: chunked"
        b"\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    stage.target.clear()
    got = exchange(stage, data, answers=1)
    assert got.startswith(b"HTTP/1.1 200 "), got[:300]
    deadline = time.monotonic() + 5
    while b"\r\n0\r\n" not in stage.target.everything and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"hello" in stage.target.everything and b"X-Trailer" not in stage.target.everything


def exchange(stage: Stage, data: bytes, answers: int) -> bytes:
    """Send raw bytes on one connection; what came back, up to `answers` responses."""
    with socket.create_connection(("127.0.0.1", stage.gateway.port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while got.count(b"HTTP/1.1 ") < answers:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        with contextlib.suppress(OSError):
            s.settimeout(0.3)
            got += s.recv(65536)
    return got
