"""Rate limiting as the policy stage sees it: steps on a thread pool of their own, a
bound on the wait, and a refusal (never a pass) when the state database cannot answer.
On a real SQLite file and, when PostgreSQL is installed, a real database."""

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from keyswap.config.loader import LoadedConfig
from keyswap.config.model import Config
from keyswap.config.tokens import digest, new_token
from keyswap.gateway import problem
from keyswap.gateway.rate_limit import RateLimits, Unavailable, retry_after
from keyswap.gateway.runtime import Runtime
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.policy import Policy
from keyswap.state import migrations
from keyswap.state.backends import open_backend
from keyswap.state.rate_limits import Rate


@pytest.fixture
def db(state_db: str) -> str:
    with open_backend(state_db) as backend:
        migrations.upgrade(backend)
    return state_db


@pytest.fixture
def limits(db: str) -> Iterator[RateLimits]:
    opened = RateLimits(db, bound_s=0.5)
    yield opened
    opened.close()


@pytest.mark.parametrize(("wait", "header"), [(0.001, "1"), (1.0, "1"), (1.2, "2"), (59.9, "60")])
def test_retry_after_is_whole_seconds_and_at_least_one(wait: float, header: str) -> None:
    assert retry_after(wait) == header


def test_steps_run_on_threads_of_their_own(limits: RateLimits) -> None:
    rate = Rate.parse("3/min")

    async def three_and_one() -> list[float]:
        return [await limits.take("p|3/60s", rate) for _ in range(4)]

    waits = asyncio.run(three_and_one())
    assert waits[:3] == [0.0] * 3 and 19 < waits[3] <= 20
    names = {t.name for t in threading.enumerate()}
    assert any(n.startswith("keyswap-rate-limit") for n in names)


def test_an_error_is_unavailable(db: str, limits: RateLimits) -> None:
    with open_backend(db) as backend, backend.session() as session:
        session.execute("drop table rate_limits")
    with pytest.raises(Unavailable, match="rate_limits"):
        asyncio.run(limits.take("k", Rate.parse("1/s")))


def test_a_database_that_does_not_answer_in_time_is_unavailable(tmp_path: Path) -> None:
    db = tmp_path / "keyswap.db"
    with open_backend(db) as backend:
        migrations.upgrade(backend)
    limits = RateLimits(str(db), bound_s=0.3)
    rate = Rate.parse("1/h")
    try:
        with closing(sqlite3.connect(db, isolation_level=None)) as holder:
            holder.execute("begin immediate")  # another writer holds the lock
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"no answer within 0\.3 s"):
                asyncio.run(limits.take("k", rate))
            assert time.monotonic() - started < 1.0
            holder.execute("rollback")
        # the lock is free again: answered at once
        assert asyncio.run(limits.take("k2", rate)) == 0.0
    finally:
        limits.close()


def test_a_step_whose_request_was_answered_takes_no_place(tmp_path: Path) -> None:
    db = tmp_path / "keyswap.db"
    with open_backend(db) as backend:
        migrations.upgrade(backend)
    limits = RateLimits(str(db), bound_s=0.3, threads=1)
    rate = Rate.parse("1/h")

    async def two_at_once() -> list[object]:
        first, second = limits.take("first", rate), limits.take("second", rate)
        return await asyncio.gather(first, second, return_exceptions=True)

    try:
        assert asyncio.run(limits.take("warm", rate)) == 0.0
        with closing(sqlite3.connect(db, isolation_level=None)) as holder:
            holder.execute("begin immediate")
            outcomes = asyncio.run(two_at_once())
            holder.execute("rollback")
        assert all(isinstance(o, Unavailable) for o in outcomes)
        limits.close()  # the first step, under way when the lock went, finishes
        with open_backend(db) as backend, backend.session() as session:
            keys = {r["key"] for r in session.query("select key from rate_limits")}
        assert keys == {"warm", "first"}  # the queued one never ran: its request had its 503
    finally:
        limits.close()


def test_unavailability_is_logged_once_in_a_while(
    db: str, limits: RateLimits, caplog: pytest.LogCaptureFixture
) -> None:
    with open_backend(db) as backend, backend.session() as session:
        session.execute("drop table rate_limits")
    with caplog.at_level(logging.ERROR, "keyswap.gateway.rate_limit"):
        for _ in range(3):
            with pytest.raises(Unavailable):
                asyncio.run(limits.take("k", Rate.parse("1/s")))
    assert len(caplog.records) == 1
    assert "rate-limited requests get 503" in caplog.records[0].getMessage()


# --- the policy stage ----------------------------------------------------------------


def proxy(rate_limit: str | None) -> dict[str, object]:
    limit = {"rate_limit": rate_limit} if rate_limit else {}
    return {"target": "echo", "tokens": [{"id": "t", "sha256": digest(new_token())}], **limit}


CONFIG = Config.model_validate(
    {
        "credentials": {"key": {"type": "bearer", "token": "target-secret"}},
        "targets": {"echo": {"base_url": "http://127.0.0.1:9", "credential": "key"}},
        "proxies": {"limited": proxy("2/min"), "free": proxy(None)},
    }
)


@pytest.fixture
def policy(tmp_path: Path, db: str) -> Iterator[Policy]:
    settings = Settings()
    settings.runtime = Runtime.build(LoadedConfig(CONFIG, tmp_path / "keyswap.yaml", "-", 0.0))
    stage = Policy(settings)
    stage.rate_limits = RateLimits(db, bound_s=0.5)
    yield stage
    stage.done()


def routed(proxy: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.metadata[problem.PROXY] = proxy
    flow.metadata[problem.REST] = "/x"
    return flow


def decide(stage: Policy, flow: http.HTTPFlow) -> None:
    pending = stage.requestheaders(flow)
    assert pending is not None, "a rate-limited proxy waits for its step"

    async def wait() -> None:
        await pending

    asyncio.run(wait())


def test_a_proxy_without_a_rate_limit_stays_synchronous(policy: Policy) -> None:
    flow = routed("free")
    assert policy.requestheaders(flow) is None
    assert flow.response is None and flow.metadata[problem.TARGET] == "echo"


def test_over_the_limit_is_429_with_retry_after(policy: Policy) -> None:
    flows = [routed("limited") for _ in range(3)]
    for flow in flows:
        decide(policy, flow)
    assert [f.response is None for f in flows] == [True, True, False]
    assert flows[0].metadata[problem.TARGET] == "echo"
    refused = flows[2].response
    assert refused is not None and refused.status_code == 429
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["keyswap-proxy-message"] == "rate limit 2/min exceeded"
    assert problem.TARGET not in flows[2].metadata


def test_a_limit_that_cannot_be_checked_is_503_never_a_pass(db: str, policy: Policy) -> None:
    with open_backend(db) as backend, backend.session() as session:
        session.execute("drop table rate_limits")
    flow = routed("limited")
    decide(policy, flow)
    response = flow.response
    assert response is not None and response.status_code == 503
    assert problem.TARGET not in flow.metadata
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert body["error"]["code"] == "rate-limit-unavailable"
    message = body["error"]["message"]
    assert message == "the proxy's rate limit cannot be checked now; try again shortly"
    assert "rate_limits" in flow.metadata[problem.ERROR]  # the log's error column says why


def test_without_its_thread_pool_a_rate_limited_proxy_is_refused(policy: Policy) -> None:
    assert policy.rate_limits is not None
    policy.rate_limits.close()
    policy.rate_limits = None
    flow = routed("limited")
    decide(policy, flow)
    assert flow.response is not None and flow.response.status_code == 503
