"""Async requests survive gateway crashes: a gateway killed (SIGKILL) in the middle of an
attempt leaves the request to another gateway, or to the same one restarted, which
delivers it again with the same Idempotency-Key; 200 requests accepted during an outage
all succeed once the target recovers, however many gateways were killed meanwhile; and
two gateways sharing a backlog never deliver one request twice at once. Real gateway
processes on one state database (SQLite file, PostgreSQL), a scripted target
(tests/support/flaky_target.py) on loopback."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from keyswap.state.backends import Backend, open_backend
from tests.support.flaky_target import Arrival, FlakyTarget
from tests.support.processes import Gateway, start_gateway

pytestmark = pytest.mark.e2e

SECRET = "target-secret-async-crash"
CONCURRENCY = 16  # keyswap_async_concurrency, each gateway

CONFIG = """\
version: 1
credentials:
  key: {{ type: bearer, token: {secret} }}
targets:
  flaky:
    base_url: "http://127.0.0.1:{port}"
    credential: key
    timeout_s: {timeout_s}
    connect_timeout_s: 2
proxies:
  jobs:
    target: flaky
    async: {{ max_attempts: 50, max_age_s: 3600 }}
    tokens: [{{ id: t, sha256: {digest} }}]
"""


@pytest.fixture
def target() -> Iterator[FlakyTarget]:
    flaky = FlakyTarget()
    yield flaky
    flaky.close()


@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
def state(state_db: str) -> Iterator[Backend]:
    """The test's own connection to the gateways' state database (opened lazily: the
    first gateway makes the schema)."""
    backend = open_backend(state_db)
    yield backend
    backend.close()


class Cluster:
    """Gateway processes on one config and state database, each of which may be killed
    and replaced; the ones it started are stopped at the end."""

    def __init__(self, stack: ExitStack, config: Path, tmp: Path, db: str) -> None:
        self.stack, self.config, self.tmp, self.db = stack, config, tmp, db
        self.started: list[Gateway] = []

    def start(self) -> Gateway:
        gateway = start_gateway(
            self.config,
            self.tmp,
            db=self.db,
            extra=[
                "--set",
                "keyswap_async_poll_ms=200",
                "--set",
                f"keyswap_async_concurrency={CONCURRENCY}",
                "--set",
                "flow_detail=0",
            ],
        )
        self.started.append(gateway)
        self.stack.callback(gateway.stop)
        return gateway

    def logs(self) -> str:
        return "\n".join(f"--- {g.log.name}\n{g.output()[-3000:]}" for g in self.started)

    def assert_no_failures(self) -> None:
        """Killed or not, no gateway logged a failure of its own (a kill is not one)."""
        for gateway in self.started:
            output = gateway.output()
            for sign in ("Traceback", "delivery loop failed", "async queue unavailable"):
                assert sign not in output, f"{gateway.log.name}:\n{output[-5000:]}"


def kill(gateway: Gateway) -> None:
    """kill -9: no drain, no outcome written, its registry row left to go stale."""
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(10)


def cluster(
    stack: ExitStack, write_config: Any, tmp: Path, db: str, port: int, token: str, timeout_s: float
) -> Cluster:
    text = CONFIG.format(secret=SECRET, port=port, timeout_s=timeout_s, digest=digest(token))
    return Cluster(stack, write_config(text), tmp, db)


def accept(client: httpx.Client, url: str, token: str, n: int, key: str | None = None) -> str:
    """Sends request `n` with `Prefer: respond-async`; the id of its 202."""
    headers = {"authorization": f"Bearer {token}", "prefer": "respond-async"}
    if key is not None:
        headers["idempotency-key"] = key
    r = client.post(f"{url}/api/jobs/items/{n}", headers=headers, content=f"job-{n}".encode())
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/_keyswap/requests/{r.json()['id']}"
    return str(r.json()["id"])


def status(url: str, token: str, async_id: str) -> dict[str, Any]:
    r = httpx.get(
        f"{url}/_keyswap/requests/{async_id}",
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_for[T](
    what: str, probe: Callable[[], T | None], timeout: float, logs: Callable[[], str]
) -> T:
    """`probe()` once it is truthy, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{logs()}")
        time.sleep(0.1)


def query(state: Backend, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    with state.session() as session:
        return session.query(sql, params or [])


def owner_pid(state: Backend, async_id: str) -> int | None:
    """The process that holds the request's lease (`<node>:<pid>:<random>`), if any."""
    rows = query(
        state,
        "select lease_owner from async_requests where id = ? and state = 'delivering'",
        [async_id],
    )
    owner = rows[0]["lease_owner"] if rows else None
    return int(owner.split(":")[-2]) if owner else None


def in_flight(state: Backend, gateway: Gateway) -> int:
    """How many requests the gateway holds the lease of."""
    rows = query(
        state,
        "select count(*) as n from async_requests where state = 'delivering'"
        " and lease_owner like ?",
        [f"%:{gateway.proc.pid}:%"],
    )
    return int(rows[0]["n"])


def by_key(arrivals: list[Arrival]) -> dict[str, list[Arrival]]:
    keys: dict[str, list[Arrival]] = {}
    for arrival in arrivals:
        keys.setdefault(arrival.headers.get("idempotency-key", ""), []).append(arrival)
    return keys


# --- 1. a kill in the middle of an attempt -------------------------------------------------


@pytest.mark.parametrize("takeover", ["other-gateway", "restart"])
def test_an_attempt_cut_by_kill_9_is_delivered_again_with_the_same_key(
    tmp_path: Path,
    state_db: str,
    state: Backend,
    target: FlakyTarget,
    token: str,
    write_config: Any,
    takeover: str,
) -> None:
    """The first attempt is in flight at the target (which sleeps 4 s) when the gateway
    delivering it is killed: a gateway already running (`other-gateway`) or one started
    after the kill (`restart`) takes the request over once the killed one's heartbeat
    is stale (9 s), and delivers it with the same Idempotency-Key and the real
    credential."""
    target.script = ["sleep:4"]
    with ExitStack() as stack:
        gateways = cluster(stack, write_config, tmp_path, state_db, target.port, token, 10)
        first = gateways.start()
        running = [first] + ([gateways.start()] if takeover == "other-gateway" else [])
        with httpx.Client(timeout=10) as client:
            async_id = accept(client, first.url, token, 1)
        wait_for("the first attempt reaches the target", lambda: target.arrivals, 10, gateways.logs)
        pid = wait_for("its lease", lambda: owner_pid(state, async_id), 5, gateways.logs)
        [victim] = [g for g in running if g.proc.pid == pid]
        killed_at = time.monotonic()
        kill(victim)
        assert len(target.arrivals) == 1  # still in flight: the target sleeps 4 s
        survivors = [g for g in running if g is not victim] or [gateways.start()]
        url = survivors[0].url

        def done() -> dict[str, Any] | None:
            found = status(url, token, async_id)
            return found if found["state"] not in ("queued", "delivering") else None

        # The killed gateway's heartbeat goes stale within 9 s, then a poll (0.2 s) takes
        # the request; the second attempt answers at once.
        result = wait_for("the request ends", done, 30, gateways.logs)
        took = time.monotonic() - killed_at
    print(f"\nasync takeover ({takeover}): succeeded {took:.1f} s after the kill")
    assert result["state"] == "succeeded", result
    assert result["attempts"] >= 2, result
    assert result["response"]["status"] == 200
    assert result["response"]["body"] == "job-1"
    arrivals = list(target.arrivals)
    assert len(arrivals) >= 2
    keys = {a.headers.get("idempotency-key") for a in arrivals}
    assert keys == {result["idempotency_key"]}, keys
    for arrival in arrivals:
        assert arrival.method == "POST" and arrival.path == "/items/1"
        assert arrival.body == b"job-1"
        assert arrival.headers["authorization"] == f"Bearer {SECRET}"
        assert not any(token in v for v in arrival.headers.values())
        assert "prefer" not in arrival.headers
    # The takeover waits for the killed gateway's heartbeat to go stale (6-9 s after the
    # kill), by which time the cut attempt's 4 s at the target are over.
    assert target.overlaps == []
    gateways.assert_no_failures()


# --- 2. an outage, kills and restarts, then recovery ---------------------------------------


def test_two_hundred_requests_survive_an_outage_with_kills_and_restarts(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    state_db: str,
    state: Backend,
    target: FlakyTarget,
    token: str,
    write_config: Any,
) -> None:
    """200 requests accepted by 2 gateways while the target answers 503 (slowly, so that
    attempts are in flight); gateways killed and restarted at random while delivering
    (one with attempts in flight, if one has within 3 s), twice during the outage and
    twice after the target recovers (200, slowly). Every request succeeds; a key reaches
    the target with a 200 more than once only because of a kill in the middle of its
    attempt."""
    # KEYSWAP_CRASH_SEED replays a run's kill schedule (its seed is in the report line).
    seed = int(os.environ.get("KEYSWAP_CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    target.default = "sleep:0.5:503"
    total = 200
    kills: list[tuple[float, int]] = []  # (seconds since the start, attempts in flight there)
    with ExitStack() as stack:
        gateways = cluster(stack, write_config, tmp_path, state_db, target.port, token, 3)
        slots = [gateways.start(), gateways.start()]
        started = time.monotonic()

        local = threading.local()

        def one(n: int) -> tuple[str, str | None]:
            key = f"client-key-{n}" if n % 2 == 0 else None  # odd ones: keyswap makes one
            if not hasattr(local, "client"):
                local.client = stack.enter_context(httpx.Client(timeout=20))
            return accept(local.client, slots[n % 2].url, token, n, key), key

        with ThreadPoolExecutor(16) as pool:
            accepted = list(pool.map(one, range(total)))
        accepted_s = time.monotonic() - started

        for k in range(4):
            if k == 2:
                with target.lock:
                    target.default = "sleep:0.3"  # recovered: a 200, after 0.3 s
                recovered_at = time.monotonic() - started
            time.sleep(rng.uniform(1.0, 3.0))
            # A gateway with attempts in flight, if one has some within 3 s.
            deadline = time.monotonic() + 3
            while True:
                busy = [(n, in_flight(state, g)) for n, g in enumerate(slots)]
                busy = [(n, count) for n, count in busy if count]
                if busy or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            slot, count = rng.choice(busy) if busy else (rng.randrange(2), 0)
            kill(slots[slot])
            kills.append((round(time.monotonic() - started, 1), count))
            slots[slot] = gateways.start()
        killed_s = time.monotonic() - started

        ids = [async_id for async_id, _ in accepted]

        def all_done() -> list[dict[str, Any]] | None:
            rows = query(state, "select id, state, attempts, idempotency_key from async_requests")
            finished = [r for r in rows if r["state"] not in ("queued", "delivering")]
            return rows if len(finished) == total else None

        rows = wait_for("every request ends", all_done, 90, gateways.logs)
        done_s = time.monotonic() - started
        # Through the results endpoint too, on either gateway.
        results = {i: status(slots[n % 2].url, token, i) for n, i in enumerate(ids)}

    assert len(rows) == total
    assert {r["id"] for r in rows} == set(ids)
    states = Counter(r["state"] for r in results.values())
    assert states == {"succeeded": total}, (states, gateways.logs())
    for (async_id, key), result in zip(accepted, results.values(), strict=True):
        assert result["id"] == async_id
        assert result["response"]["status"] == 200
        if key is not None:
            assert result["idempotency_key"] == key

    arrivals = by_key(list(target.arrivals))
    keys = {result["idempotency_key"] for result in results.values()}
    assert len(keys) == total
    assert set(arrivals) == keys  # nothing arrived without a key, or with another one
    ok = {key: sum(a.status == 200 for a in arrivals[key]) for key in keys}
    lost = sorted(key for key, n in ok.items() if n == 0)
    assert lost == []
    duplicates = {key: n for key, n in ok.items() if n > 1}
    extra = sum(n - 1 for n in duplicates.values())
    attempts = Counter(a.status for a in target.arrivals)
    line = (
        f"async duplicates: {len(duplicates)} keys answered 200 more than once"
        f" ({extra} extra 200s) after {len(kills)} kills (at s, attempts in flight: {kills});"
        f" backend {state.kind}; seed {seed}; {total} accepted in {accepted_s:.1f} s,"
        f" target recovered at {recovered_at:.1f} s, last kill at {killed_s:.1f} s,"
        f" all succeeded at {done_s:.1f} s; target answers {dict(attempts)};"
        f" overlaps {len(target.overlaps)}"
    )
    print(line)  # in the test's report
    with capsys.disabled():  # and on the terminal, -s or not
        print("\n" + line)
    assert len(duplicates) <= len(kills) * CONCURRENCY, line
    gateways.assert_no_failures()


# --- 3. two gateways, one backlog, no kills ------------------------------------------------


def test_two_gateways_share_a_backlog_and_deliver_each_request_once(
    tmp_path: Path,
    state_db: str,
    state: Backend,
    target: FlakyTarget,
    token: str,
    write_config: Any,
) -> None:
    """500 requests accepted by 2 gateways while the target holds the first attempts of
    each gateway's every slot: the rest wait in the queue. Then the target lets them go
    (and takes 0.3 s for each after): both gateways lease from the one backlog at once,
    no request is delivered by both at the same time, and without a crash each is
    delivered exactly once."""
    target.default = "hold"
    total = 500
    with ExitStack() as stack:
        # A held attempt waits for the whole accepting phase: a long response timeout.
        gateways = cluster(stack, write_config, tmp_path, state_db, target.port, token, 120)
        pair = [gateways.start(), gateways.start()]
        started = time.monotonic()
        local = threading.local()

        def one(n: int) -> str:
            if not hasattr(local, "client"):
                local.client = stack.enter_context(httpx.Client(timeout=20))
            return accept(local.client, pair[n % 2].url, token, n)

        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(one, range(total)))
        accepted_s = time.monotonic() - started
        slots = 2 * CONCURRENCY
        wait_for(
            "every slot holds an attempt", lambda: len(target.arrivals) >= slots, 20, gateways.logs
        )
        queued = query(state, "select count(*) as n from async_requests where state = 'queued'")
        with target.lock:
            target.default = "sleep:0.3"
        target.gate.set()

        def all_done() -> list[dict[str, Any]] | None:
            rows = query(state, "select id, state, attempts from async_requests")
            finished = [r for r in rows if r["state"] not in ("queued", "delivering")]
            return rows if len(finished) == total else None

        rows = wait_for("every request ends", all_done, 90, gateways.logs)
        done_s = time.monotonic() - started
        for gateway in pair:  # a clean stop writes every activity row
            assert gateway.stop() == 0, gateway.output()[-3000:]

    assert queued[0]["n"] == total - slots  # the backlog both gateways then shared
    assert {r["id"] for r in rows} == set(ids)
    assert Counter(r["state"] for r in rows) == {"succeeded": total}
    assert Counter(r["attempts"] for r in rows) == {1: total}
    assert target.overlaps == []
    gateways.assert_no_failures()
    arrivals = by_key(list(target.arrivals))
    assert len(arrivals) == total
    assert all(len(a) == 1 for a in arrivals.values())
    # The attempts' activity rows (not the 202s'): one per request, from both gateways.
    attempts = query(
        state,
        "select async_id, gateway from requests where async_id is not null and attempts >= 1"
        " and id not in (select accepted_request_id from async_requests)",
    )
    assert Counter(r["async_id"] for r in attempts) == dict.fromkeys(ids, 1)
    per_gateway = Counter(int(r["gateway"].split(":")[-2]) for r in attempts)
    assert set(per_gateway) == {g.proc.pid for g in pair}, per_gateway
    print(
        f"\nasync backlog ({state.kind}): {total} accepted in {accepted_s:.1f} s, all delivered"
        f" at {done_s:.1f} s; attempts per gateway {dict(per_gateway)}"
    )
