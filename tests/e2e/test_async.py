"""`Prefer: respond-async` end to end: a real gateway, a scripted target on loopback,
httpx as the client. Accepted requests are delivered with retries and the same
Idempotency-Key; refusals stay synchronous; results are the accepting proxy's alone; a
body past the bound is 413; the state database never holds a target credential or a
proxy token. (Crashes and several gateways: test_async_crashes.py.)"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.flaky_target import FlakyTarget
from tests.support.processes import Gateway, start_gateway
from tests.support.proxies import have_squid, start_squid

pytestmark = pytest.mark.e2e

SECRET = "target-secret-0a1b2c3d"
CONFIG = """\
version: 1
upstream_proxies:
  corp: {{ type: http, host: 127.0.0.1, port: {squid}, auth: {{ type: basic, user: u, password: corp-pw-77 }} }}
credentials:
  key: {{ type: bearer, token: {secret} }}
targets:
  flaky: {{ base_url: "http://127.0.0.1:{port}", credential: key, timeout_s: 5 }}
  via-corp: {{ base_url: "http://127.0.0.1:{port}", credential: key, upstream_proxy: corp }}
proxies:
  p:
    target: flaky
    methods: [GET, POST]
    rules: [{{ deny: {{ path: /forbidden/** }} }}]
    async: {{ max_attempts: {attempts}, max_age_s: {max_age} }}
    tokens: [{{ id: web, sha256: {p} }}]
  other: {{ target: flaky, tokens: [{{ id: t, sha256: {other} }}] }}
  limited: {{ target: flaky, rate_limit: 1/min, tokens: [{{ id: t, sha256: {limited} }}] }}
  corp: {{ target: via-corp, tokens: [{{ id: t, sha256: {corp} }}] }}
"""


@dataclass
class Setup:
    gateway: Gateway
    target: FlakyTarget
    tokens: dict[str, str]
    db: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def send(self, proxy: str, path: str = "/things", **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.tokens[proxy]}", "prefer": "respond-async"}
        headers |= kw.pop("headers", {})
        method = kw.pop("method", "POST")
        return httpx.request(method, f"{self.url}/api/{proxy}{path}", headers=headers, **kw)

    def result(self, location: str, proxy: str = "p") -> httpx.Response:
        token = {"authorization": f"Bearer {self.tokens[proxy]}"}
        return httpx.get(self.url + location, headers=token)

    def wait_done(self, location: str, proxy: str = "p", seconds: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state: dict[str, Any] = self.result(location, proxy).json()
            if state["state"] not in ("queued", "delivering"):
                return state
            time.sleep(0.1)
        raise AssertionError(f"not done in {seconds} s: {state}")


def start(
    tmp: Path,
    db: str | None,
    script: list[str],
    attempts: int = 5,
    max_age: float = 3600,
    extra: list[str] | None = None,
) -> Setup:
    target = FlakyTarget(script=list(script))
    tokens = {name: new_token() for name in ("p", "other", "limited", "corp")}
    text = CONFIG.format(
        port=target.port,
        squid=1,
        secret=SECRET,
        attempts=attempts,
        max_age=max_age,
        **{name: digest(token) for name, token in tokens.items()},
    )
    path = tmp / "keyswap.yaml"
    path.write_text(text)
    options = ["--set", "keyswap_async_poll_ms=200", "--set", "flow_detail=2", *(extra or [])]
    gateway = start_gateway(path, tmp, db=db, extra=options)
    return Setup(gateway, target, tokens, db or str(tmp / f"keyswap-{gateway.port}.db"))


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    """Starts the target and the gateway (SQLite) with the given script and policy."""
    started: list[Setup] = []

    def make(script: list[str] = (), **policy: Any) -> Setup:  # type: ignore[assignment]
        started.append(start(tmp_path, None, list(script), **policy))
        return started[-1]

    yield make
    for s in started:
        s.gateway.stop()
        s.target.close()


@pytest.fixture
def setup(make: Any) -> Setup:
    return make()  # type: ignore[no-any-return]


def rows(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]


def test_delivered_once_the_target_recovers_with_one_idempotency_key(
    tmp_path: Path, state_db: str
) -> None:
    """503, then a dropped connection, then 429 with Retry-After: 1, then 200."""
    s = start(tmp_path, state_db, ["503", "drop", "429:1"])
    try:
        r = s.send("p", "/things?x=1", content=b'{"amount": 5}')
        assert r.status_code == 202, r.text
        assert r.headers["preference-applied"] == "respond-async"
        assert r.headers["keyswap-proxy-code"] == "proxy-access-granted"
        location = r.headers["location"]
        body = r.json()
        assert location == f"/_keyswap/requests/{body['id']}" and body["state"] == "queued"
        done = s.wait_done(location)
    finally:
        s.gateway.stop()
        s.target.close()
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 4 and done["last_error"] is None
    assert done["response"]["status"] == 200
    assert done["response"]["body"] == '{"amount": 5}'
    arrivals = s.target.arrivals
    assert len(arrivals) == 4
    keys = {a.headers["idempotency-key"] for a in arrivals}
    assert keys == {done["idempotency_key"]} and done["idempotency_key"].startswith("keyswap-")
    for a in arrivals:
        assert a.headers["authorization"] == f"Bearer {SECRET}"
        assert a.path == "/things?x=1" and a.body == b'{"amount": 5}'
        assert "prefer" not in a.headers
        assert not any("ks_" in v for v in a.headers.values())
    gaps = [b.at - a.at for a, b in itertools.pairwise(arrivals)]
    # full jitter: up to 1 s, then 2 s, then 4 s (plus the poll); the 429's Retry-After: 1
    assert gaps[0] < 1.6 and gaps[1] < 2.6 and 1.0 <= gaps[2] < 4.6, gaps


def test_each_attempt_is_a_log_row_and_the_202_is_one_too(setup: Setup) -> None:
    setup.target.script[:] = ["503"]
    r = setup.send("p")
    done = setup.wait_done(r.headers["location"])
    setup.gateway.stop()
    found = rows(
        setup.db,
        "select status, attempts, async_id, proxy_code, target_url from requests"
        " where async_id = ? order by started_at",
        (done["id"],),
    )
    assert [(f["status"], f["attempts"]) for f in found] == [(202, 0), (503, 1), (200, 2)]
    assert found[0]["proxy_code"] == "proxy-access-granted" and found[0]["target_url"] is None
    assert done["accepted_request_id"] == r.headers["keyswap-request-id"]


def test_the_clients_idempotency_key_is_kept(setup: Setup) -> None:
    r = setup.send("p", headers={"idempotency-key": "order-42", "prefer": "respond-async, wait=5"})
    done = setup.wait_done(r.headers["location"])
    assert done["idempotency_key"] == "order-42"
    [arrival] = setup.target.arrivals
    assert arrival.headers["idempotency-key"] == "order-42"
    assert arrival.headers["prefer"] == "wait=5"  # the rest of Prefer is the target's


def test_failed_after_max_attempts_keeps_the_last_answer(make: Any) -> None:
    setup = make(attempts=2)
    setup.target.default = "503"
    done = setup.wait_done(setup.send("p").headers["location"])
    assert done["state"] == "failed" and done["attempts"] == 2
    assert done["last_error"] == "the target answered 503"
    assert done["response"]["status"] == 503
    assert len(setup.target.arrivals) == 2


def test_expired_when_the_next_attempt_would_be_past_max_age(make: Any) -> None:
    setup = make(max_age=1.5)
    setup.target.default = "503:5"  # Retry-After: 5, beyond the age
    done = setup.wait_done(setup.send("p").headers["location"])
    assert done["state"] == "expired" and done["attempts"] == 1


def test_a_4xx_answer_is_delivered_not_retried(setup: Setup) -> None:
    setup.target.script[:] = ["404"]
    done = setup.wait_done(setup.send("p").headers["location"])
    assert done["state"] == "succeeded" and done["response"]["status"] == 404
    assert len(setup.target.arrivals) == 1


def test_refusals_stay_synchronous_and_nothing_is_queued(setup: Setup) -> None:
    wrong = setup.send("p", headers={"authorization": f"Bearer {new_token()}"})
    assert wrong.status_code == 401
    assert setup.send("p", method="DELETE").status_code == 405
    assert setup.send("p", "/forbidden/x").status_code == 403
    assert setup.send("limited").status_code == 202  # 1/min: the first passes
    limited = setup.send("limited")
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert "location" not in wrong.headers and "location" not in limited.headers
    upgrade = {"connection": "upgrade", "upgrade": "websocket"}
    assert setup.send("p", method="GET", headers=upgrade).status_code == 400
    time.sleep(1.0)
    assert len(setup.target.arrivals) == 1  # only the one accepted
    queued = rows(setup.db, "select proxy_id from async_requests")
    assert queued == [{"proxy_id": "limited"}]


def test_only_the_accepting_proxys_tokens_read_a_result(setup: Setup) -> None:
    location = setup.send("p").headers["location"]
    setup.wait_done(location)
    assert setup.result(location, "p").status_code == 200
    other = setup.result(location, "other")
    assert other.status_code == 404 and other.json()["error"]["code"] == "unknown-async-request"
    unknown = setup.result("/_keyswap/requests/" + "0" * 26, "p")
    assert unknown.status_code == 404
    assert httpx.get(setup.url + location).status_code == 401
    token = {"x-proxy-token": setup.tokens["p"]}
    assert httpx.post(setup.url + location, headers=token).status_code == 405


def test_a_body_over_the_bound_is_413_declared_or_chunked(setup: Setup) -> None:
    big = b"x" * (2 * 1024 * 1024)
    declared = setup.send("p", content=big)
    assert declared.status_code == 413
    assert declared.headers["content-type"] == "application/problem+json"

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    chunked = setup.send("p", content=chunks())
    assert chunked.status_code == 413
    assert "max_async_body_bytes" in chunked.json()["detail"]
    assert setup.send("p", content=b"small").status_code == 202  # the gateway still serves
    time.sleep(0.5)
    assert all(len(a.body) < 100 for a in setup.target.arrivals)
    assert len(rows(setup.db, "select id from async_requests")) == 1


def test_a_rotated_token_stops_what_it_queued(make: Any, tmp_path: Path) -> None:
    setup = make(attempts=50)
    setup.target.default = "503:1"  # retried every second or so
    setup.send("p")
    deadline = time.monotonic() + 10
    while not setup.target.arrivals and time.monotonic() < deadline:
        time.sleep(0.1)
    config = tmp_path / "keyswap.yaml"  # the token `web` rotated: another digest, same id
    config.write_text(config.read_text().replace(digest(setup.tokens["p"]), digest(new_token())))
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = rows(setup.db, "select state, last_error from async_requests")
        if found[0]["state"] == "failed":
            break
        time.sleep(0.2)
    revoked = "the token that sent this request was rotated or deleted since"
    assert found == [{"state": "failed", "last_error": revoked}]
    arrived = len(setup.target.arrivals)
    time.sleep(2.5)
    assert len(setup.target.arrivals) == arrived  # nothing more reaches the target


def test_a_full_queue_refuses_new_requests_503(tmp_path: Path) -> None:
    s = start(tmp_path, None, [], extra=["--set", "keyswap_async_max_queued=3"])
    try:
        s.target.default = "503:60"  # nothing is delivered: the queue stays full
        assert [s.send("p").status_code for _ in range(3)] == [202, 202, 202]
        full = s.send("p")
        assert full.status_code == 503 and full.json()["error"]["code"] == "async-queue-full"
        assert s.send("other").status_code == 202  # the bound is per proxy
    finally:
        s.gateway.stop()
        s.target.close()


def test_the_database_holds_no_target_credential_and_no_token(setup: Setup) -> None:
    """The target echoes the request's headers, credential included: the stored answer
    has it masked, and the stored request never had it."""
    setup.target.script[:] = ["echo"]
    token = setup.tokens["p"]
    r = setup.send("p", f"/things?key={token}", headers={"x-api-key": token})
    done = setup.wait_done(r.headers["location"])
    echoed = {k.lower(): v for k, v in json.loads(done["response"]["body"]).items()}
    assert echoed["authorization"] == "Bearer ********"
    assert setup.target.arrivals[0].headers["authorization"] == f"Bearer {SECRET}"
    setup.gateway.stop()
    db = Path(setup.db)
    data = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert SECRET.encode() not in data
    assert token.encode() not in data and token[3:].encode() not in data
    output = setup.gateway.log.read_text()  # the flows mitmdump printed, the gateway's log
    assert SECRET not in output and token[3:] not in output


def test_a_compressed_echo_is_stored_decoded_and_masked(setup: Setup) -> None:
    """The client cannot make the target compress its answer past the masking: its
    Accept-Encoding is not stored, and a compressed answer is decoded before masking."""
    setup.target.script[:] = ["echo-gzip"]
    r = setup.send("p", headers={"accept-encoding": "gzip"})
    done = setup.wait_done(r.headers["location"])
    assert "accept-encoding" not in {k.lower() for k in setup.target.arrivals[0].headers}
    response = done["response"]
    assert "content-encoding" not in response["headers"]
    echoed = {k.lower(): v for k, v in json.loads(response["body"]).items()}
    assert echoed["authorization"] == "Bearer ********"
    setup.gateway.stop()
    db = Path(setup.db)
    assert SECRET.encode() not in b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_health_shows_the_queue(setup: Setup) -> None:
    setup.target.default = "503:60"
    setup.send("p")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        figures = httpx.get(setup.url + "/_keyswap/health").json()["async"]
        if figures.get("queued") == 1:
            break
        time.sleep(0.2)
    assert figures["queued"] == 1 and figures["oldest_queued_age_s"] >= 0
    assert {"delivering", "failed_last_hour", "delivering_here", "attempts_here"} <= set(figures)


@pytest.mark.skipif(not have_squid(), reason="squid is needed (.ci/run installs it)")
def test_delivery_goes_through_the_targets_upstream_proxy(tmp_path: Path) -> None:
    squid = start_squid("u", "corp-pw-77")
    target = FlakyTarget()
    tokens = {name: new_token() for name in ("p", "other", "limited", "corp")}
    text = CONFIG.format(
        port=target.port,
        squid=squid.port,
        secret=SECRET,
        attempts=3,
        max_age=600,
        **{name: digest(token) for name, token in tokens.items()},
    )
    (tmp_path / "keyswap.yaml").write_text(text)
    gateway = start_gateway(tmp_path / "keyswap.yaml", tmp_path)
    s = Setup(gateway, target, tokens, str(tmp_path / f"keyswap-{gateway.port}.db"))
    try:
        done = s.wait_done(s.send("corp", "/via-squid").headers["location"], "corp")
    finally:
        gateway.stop()
        target.close()
        log = squid.access_log()
        squid.stop()
    assert done["state"] == "succeeded", done
    assert "squid" in target.arrivals[0].headers.get("via", "")
    assert "/via-squid" in log and " u " in log
