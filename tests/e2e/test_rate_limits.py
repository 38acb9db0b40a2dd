"""A proxy's `rate_limit` holds for every gateway on one state database together: three
gateway processes on three ports, one config (`rate_limit: 10/s`), one `--db`, and a
target that counts what reaches it. A state database that cannot answer refuses
rate-limited requests (503), never lets them through. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.counting_target import CountingTarget
from tests.support.postgres import have_postgres, start_postgres
from tests.support.processes import Gateway, start_gateway

pytestmark = pytest.mark.e2e

RATE, BURST = 10, 10  # `10/s`: ten a second, bursts of ten


@dataclass(frozen=True)
class Outcome:
    gateway: int
    status: int
    retry_after: str | None
    code: str | None  # the problem's error.code
    seconds: float  # from sending the request to its whole answer


@pytest.fixture
def target() -> Iterator[CountingTarget]:
    counting = CountingTarget()
    yield counting
    counting.close()


# the proxy `limited`, with the rate limit, in front of the counting target
CONFIG = """\
version: 1
credentials:
  key: {{ type: bearer, token: target-secret }}
targets:
  counter: {{ base_url: "http://127.0.0.1:{port}", credential: key }}
proxies:
  limited: {{ target: counter, rate_limit: {rate}/s, tokens: [{{ id: t, sha256: {digest} }}] }}
"""


@pytest.fixture
def limited_proxy(write_config: Any, target: CountingTarget) -> tuple[Path, str]:
    """The config file, and the proxy's token."""
    token = new_token()
    return write_config(CONFIG.format(port=target.port, rate=RATE, digest=digest(token))), token


def start_gateways(tmp: Path, config: Path, db: str, count: int) -> list[Gateway]:
    started: list[Gateway] = []
    try:
        for _ in range(count):
            started.append(start_gateway(config, tmp, db=db, extra=["--set", "flow_detail=0"]))
    except Exception:
        for gateway in started:
            gateway.stop()
        raise
    return started


def hammer(urls: list[str], token: str, seconds: float, per_gateway: int = 4) -> list[Outcome]:
    """Requests as fast as `per_gateway` connections to each gateway can send them, all
    starting at once, for `seconds`."""
    outcomes: list[Outcome] = []
    start = threading.Barrier(len(urls) * per_gateway)

    def run(n: int, url: str) -> None:
        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(timeout=10) as client:
            start.wait()
            deadline = time.monotonic() + seconds
            while (sent := time.monotonic()) < deadline:
                r = client.get(f"{url}/api/limited/x", headers=headers)
                took = time.monotonic() - sent
                code = r.json()["error"]["code"] if r.status_code != 200 else None
                outcomes.append(Outcome(n, r.status_code, r.headers.get("retry-after"), code, took))

    threads = [
        threading.Thread(target=run, args=(n, url))
        for n, url in enumerate(urls)
        for _ in range(per_gateway)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_three_gateways_share_one_limit(
    tmp_path: Path, state_db: str, target: CountingTarget, limited_proxy: tuple[Path, str]
) -> None:
    config, token = limited_proxy
    gateways = start_gateways(tmp_path, config, state_db, 3)
    try:
        started = time.monotonic()
        outcomes = hammer([g.url for g in gateways], token, seconds=2.0)
        elapsed = time.monotonic() - started
    finally:
        for gateway in gateways:
            gateway.stop()
    passed = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    assert {o.status for o in refused} == {429}, {o.status for o in refused}
    assert len(passed) == len(target.arrivals)
    # Every request was decided within the run: the burst, then ten a second, across
    # all three gateways together ...
    limit = BURST + RATE * elapsed
    assert BURST + RATE <= len(passed) <= limit, (len(passed), elapsed)
    # ... while limits of their own would have let through two or three times as many.
    asked = [sum(o.gateway == n for o in outcomes) for n in range(3)]
    assert sum(min(n, limit) for n in asked) >= 2 * limit, asked
    # Counted at the target, at most the burst and ten more within any second. A request
    # reaches the target some time after its place was taken (at most its whole round
    # trip), which can bunch arrivals closer than their places: that much more is allowed.
    late = max(o.seconds for o in passed)
    most = target.most_within(1.0)
    assert most <= RATE + BURST + math.ceil(late * RATE), (most, late)
    for o in refused:
        assert o.code == "rate-limit" and o.retry_after == "1"


def test_a_database_that_does_not_answer_refuses_with_503(
    tmp_path: Path, target: CountingTarget, limited_proxy: tuple[Path, str]
) -> None:
    """SQLite: another writer holds the database's write lock longer than the bound."""
    config, token = limited_proxy
    db = tmp_path / "keyswap.db"
    [gateway] = start_gateways(tmp_path, config, str(db), 1)
    headers = {"authorization": f"Bearer {token}"}
    url = f"{gateway.url}/api/limited/x"
    try:
        assert httpx.get(url, headers=headers).status_code == 200
        with closing(sqlite3.connect(db, isolation_level=None)) as holder:
            holder.execute("begin immediate")
            started = time.monotonic()
            r = httpx.get(url, headers=headers, timeout=10)
            waited = time.monotonic() - started
            holder.execute("rollback")
        assert_unavailable(r, str(db))
        assert 1.5 < waited < 4, waited  # the bound is 2 s
        assert httpx.get(url, headers=headers).status_code == 200  # answered again
    finally:
        gateway.stop()
    assert len(target.arrivals) == 2
    assert "rate limits cannot be checked" in gateway.output()


def test_a_stopped_postgresql_refuses_with_503(
    tmp_path: Path, target: CountingTarget, limited_proxy: tuple[Path, str]
) -> None:
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    config, token = limited_proxy
    cluster = start_postgres()  # its own: this test stops it
    running = True
    headers = {"authorization": f"Bearer {token}"}
    try:
        [gateway] = start_gateways(tmp_path, config, cluster.create_database(), 1)
        url = f"{gateway.url}/api/limited/x"
        try:
            assert httpx.get(url, headers=headers).status_code == 200
            cluster.stop()
            running = False
            started = time.monotonic()
            r = httpx.get(url, headers=headers, timeout=10)
            assert time.monotonic() - started < 4
            assert_unavailable(r, cluster.password, f":{cluster.port}")
            # The heartbeat (every 3 s) finds the database gone: health says so with 503.
            health = eventually_unhealthy(f"{gateway.url}/_keyswap/health")
            assert health["backend"]["kind"] == "postgresql"
            assert health["backend"]["reachable"] is False
            assert cluster.password not in json.dumps(health)
        finally:
            gateway.stop()
    finally:
        if running:
            cluster.stop()
    assert len(target.arrivals) == 1


def eventually_unhealthy(url: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url, timeout=5)
        if r.status_code == 503 or time.monotonic() > deadline:
            assert r.status_code == 503, r.text
            return r.json()  # type: ignore[no-any-return]
        time.sleep(0.2)


def assert_unavailable(r: httpx.Response, *unsaid: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.headers["keyswap-proxy-code"] == "proxy-error"
    assert r.json()["error"]["code"] == "rate-limit-unavailable"
    for text in unsaid:  # no address, path or password
        assert text not in r.text and text not in str(r.headers)
