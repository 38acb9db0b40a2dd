"""End to end: OAuth2 credentials against a real local authorization server."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support import ROOT
from tests.support.processes import BIN, Gateway, Process, free_port, start, start_gateway

pytestmark = pytest.mark.e2e

SECRET = "oauth-client-secret-9f8e"
REFRESH = "rt-0-initial"
SERVER = ROOT / "tests" / "support" / "oauth_server.py"


@dataclass
class Setup:
    auth: Process
    gateway: Gateway
    token: str
    tmp: Path
    config: Path
    db: Path | str

    def get(self, path: str = "/echo", **kw: object) -> httpx.Response:
        return httpx.get(
            f"{self.gateway.url}/api/crm{path}",
            headers={"x-proxy-token": self.token},
            timeout=30,
            **kw,
        )  # type: ignore[arg-type]

    def admin(self, what: str, body: str = "") -> dict[str, object]:
        r = httpx.request(
            "GET" if what == "stats" else "POST", f"{self.auth.url}/admin/{what}", content=body
        )
        return r.json()  # type: ignore[no-any-return]

    def restart(self) -> None:
        self.gateway.stop()
        self.gateway = gateway(self.config, self.tmp, self.db)


ENV = {"OAUTH_SECRET": SECRET, "OAUTH_REFRESH": REFRESH}


def gateway(config: Path, tmp: Path, db: Path | str) -> Gateway:
    stream = tmp / f"flows-{free_port()}.mitm"
    return start_gateway(config, tmp, db=db, extra=["--set", f"save_stream_file={stream}"], env=ENV)


def make(
    tmp: Path,
    expires_in: int = 3600,
    skew: float = 60,
    client_auth: str = "basic",
    db: Path | str | None = None,
    timeout_s: float = 30,
) -> Setup:
    """The authorization server and a gateway (state in `db`, default a new SQLite file)."""
    port = free_port()
    auth = start(
        [
            sys.executable,
            str(SERVER),
            "--port",
            str(port),
            "--client-secret",
            SECRET,
            "--refresh-token",
            REFRESH,
            "--expires-in",
            str(expires_in),
        ],
        port,
        tmp / "oauth.log",
    )
    token = new_token()
    config = tmp / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  crm:
    type: oauth2
    grant: refresh_token
    token_url: http://127.0.0.1:{port}/token
    client_id: keyswap
    client_secret: "${{env:OAUTH_SECRET}}"
    refresh_token: "${{env:OAUTH_REFRESH}}"
    client_auth: {client_auth}
    refresh_skew_s: {skew}
targets:
  crm: {{ base_url: "http://127.0.0.1:{port}/api", credential: crm, timeout_s: {timeout_s} }}
proxies:
  crm: {{ target: crm, tokens: [{{ id: t, sha256: {digest(token)} }}] }}
"""
    )
    db = db or tmp / "keyswap.db"
    return Setup(auth, gateway(config, tmp, db), token, tmp, config, db)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = make(tmp_path)
    yield s
    s.gateway.stop()
    s.auth.stop()


def calls(s: Setup) -> int:
    return int(s.admin("stats")["token_calls"])  # type: ignore[call-overload]


def db_rows(s: Setup, sql: str) -> list[dict[str, object]]:
    conn = sqlite3.connect(s.db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_first_request_fetches_and_later_ones_reuse(setup: Setup) -> None:
    tokens = {setup.get().json()["token"] for _ in range(3)}
    assert len(tokens) == 1 and calls(setup) == 1


def test_near_expiry_refreshes_before_the_target_says_so(tmp_path: Path) -> None:
    s = make(tmp_path, expires_in=3, skew=2.5)
    try:
        first = s.get().json()["token"]
        import time

        time.sleep(0.7)  # inside the skew: refresh before use
        second = s.get()
        assert second.status_code == 200 and second.json()["token"] != first
        assert calls(s) == 2
    finally:
        s.gateway.stop()
        s.auth.stop()


def test_401_means_one_refresh_and_one_retry(setup: Setup) -> None:
    first = setup.get().json()["token"]
    setup.admin("expire")
    r = setup.get("/echo/after")
    assert r.status_code == 200 and r.json()["token"] != first
    assert r.headers["keyswap-proxy-code"] == "proxy-access-granted"
    assert "retried after an oauth2 refresh" in r.headers["keyswap-proxy-message"]
    assert calls(setup) == 2
    setup.gateway.stop()
    row = db_rows(setup, "select * from requests where path = '/api/crm/echo/after'")[0]
    assert row["attempts"] == 2 and row["status"] == 200
    refresh = db_rows(setup, "select * from requests where message like 'oauth2 token refresh%'")
    assert len(refresh) == 2 and all(r["status"] == 200 for r in refresh)


def test_an_async_delivery_refreshes_once_and_retries(setup: Setup) -> None:
    """The delivery of a respond-async request goes through the OAuth2 stage too: the
    token goes on at delivery, and a 401 there means one refresh and one retry."""
    setup.get()
    setup.admin("expire")
    r = httpx.post(
        f"{setup.gateway.url}/api/crm/echo/later",
        content=b"queued body",
        headers={"x-proxy-token": setup.token, "prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    read = {"x-proxy-token": setup.token}
    deadline = time.monotonic() + 20
    while (done := httpx.get(setup.gateway.url + r.headers["location"], headers=read).json())[
        "state"
    ] in ("queued", "delivering") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done["state"] == "succeeded" and done["attempts"] == 1, done
    answer = json.loads(done["response"]["body"])
    assert answer["body"] == "queued body" and answer["token"] == "********"  # masked
    assert calls(setup) == 2


def test_a_post_body_is_retried_unchanged(setup: Setup) -> None:
    setup.get()
    setup.admin("expire")
    body = {"name": "Ada", "n": [1, 2, 3]}
    r = httpx.post(
        f"{setup.gateway.url}/api/crm/echo/items", json=body, headers={"x-proxy-token": setup.token}
    )
    assert (
        r.status_code == 200
        and json.loads(r.json()["body"]) == body
        and r.json()["method"] == "POST"
    )


def test_fifty_concurrent_requests_cause_one_refresh(setup: Setup) -> None:
    setup.get()
    setup.admin("expire")
    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda i: setup.get(f"/echo/{i}").status_code, range(50)))
    assert statuses == [200] * 50
    assert calls(setup) == 2


@pytest.mark.parametrize("mode", ["down", "invalid_grant", "garbage"])
def test_a_failing_token_endpoint_returns_the_original_401(setup: Setup, mode: str) -> None:
    setup.get()
    setup.admin("mode", mode)
    setup.admin("expire")
    r = setup.get()
    assert r.status_code == 401 and r.json() == {"error": "expired or unknown token"}
    before = calls(setup)
    assert setup.get().status_code == 401  # not hammered: no new token call
    assert calls(setup) == before
    health = httpx.get(f"{setup.gateway.url}/_keyswap/health").json()["oauth2"]["crm"]
    expected = {
        "down": "unreachable",
        "invalid_grant": "invalid_grant",
        "garbage": "invalid_response",
    }
    assert health["error"].startswith(expected[mode])
    assert health["terminal"] is (mode == "invalid_grant")
    assert setup.gateway.proc.poll() is None
    output = setup.gateway.output()
    assert output.count("token endpoint answered") == 1  # logged once
    live = subprocess.run(
        [
            str(BIN / "keyswap"),
            "check",
            "--live",
            "--config",
            str(setup.config),
            "--db",
            str(setup.db),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **ENV},
        check=False,
    )
    assert f"oauth2 crm: last refresh failed: {health['error']}" in live.stdout
    assert live.returncode == (1 if mode == "invalid_grant" else 0)


def test_the_rotated_refresh_token_survives_a_restart(setup: Setup) -> None:
    setup.get()  # rt-0 -> rotated
    setup.restart()
    setup.admin("expire")
    assert setup.get().status_code == 200
    stats = setup.admin("stats")
    assert stats["spent_reused"] == []
    seen = stats["refresh_tokens_seen"]
    assert seen[0] == REFRESH and seen[1] != REFRESH and seen.count(REFRESH) == 1  # type: ignore[union-attr, index]


def test_client_auth_in_the_body(tmp_path: Path) -> None:
    s = make(tmp_path, client_auth="body")
    try:
        assert s.get().status_code == 200
    finally:
        s.gateway.stop()
        s.auth.stop()


def test_no_token_or_secret_leaves(setup: Setup) -> None:
    assert setup.get("/quiet").status_code == 200
    setup.admin("expire")
    assert setup.get("/quiet").status_code == 200  # refresh + retry
    setup.gateway.stop()
    stats = setup.admin("stats")
    issued = re.compile(rb"at-\d+-access|rt-\d+-rotated")
    places = {
        "database": b"".join(p.read_bytes() for p in setup.tmp.glob("keyswap.db*")),
        "flows": b"".join(p.read_bytes() for p in setup.tmp.glob("flows-*.mitm")),
        "output": setup.gateway.output().encode(),
    }
    assert places["flows"], "no flows were saved"
    for where, data in places.items():
        assert not issued.search(data), f"an issued token in the {where}"
        for secret in (SECRET, REFRESH, *stats["refresh_tokens_seen"]):  # type: ignore[misc]
            assert secret.encode() not in data, f"{secret} in the {where}"


def test_poisoned_requests_during_a_refresh_cannot_lose_the_rotated_token(setup: Setup) -> None:
    """Token state is committed on its own, not in the activity log's batches, which a
    request with bytes that are not UTF-8 once failed whole."""
    setup.get()
    setup.admin("expire")
    poison = {"x-proxy-token": setup.token.encode(), "user-agent": b"bad-\xff\xfe"}

    def poisoned(_: int) -> int:
        return httpx.get(f"{setup.gateway.url}/api/crm/echo", headers=poison).status_code

    with ThreadPoolExecutor(8) as pool:
        refreshed = pool.submit(setup.get, "/echo/refresh")
        statuses = list(pool.map(poisoned, range(40)))
        assert refreshed.result().status_code == 200
    assert set(statuses) <= {200, 401}
    setup.restart()
    setup.admin("expire")  # the cached access token is refused: refresh with the stored one
    r = setup.get("/echo/after-restart")
    assert r.status_code == 200, r.text
    assert setup.admin("stats")["spent_reused"] == []


def test_an_access_token_in_a_logged_body_is_masked(setup: Setup) -> None:
    """The target here echoes the access token it received; with body previews on, the
    log must show it masked like any configured secret."""
    setup.gateway.stop()
    setup.gateway = start_gateway(
        setup.config, setup.tmp, db=setup.db, env=ENV, extra=["--set", "keyswap_log_bodies=4096"]
    )
    r = setup.get()
    access = r.json()["token"]
    assert r.status_code == 200 and access
    setup.gateway.stop()  # flushes the log
    with sqlite3.connect(setup.db) as db:
        bodies = [row[0] for row in db.execute("select response_body from requests")]
    db.close()
    assert any(b and "********" in b for b in bodies)
    assert not any(b and access in b for b in bodies)
