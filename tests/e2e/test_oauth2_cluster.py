"""End to end: one OAuth2 refresh for every gateway sharing a state database.

The authorization server rotates refresh tokens and refuses a spent one
(tests/support/oauth_server.py), as providers that rotate do: two gateways that both
refresh with the same refresh token leave one of them with `invalid_grant`. Checked on
both backends, with separate gateway processes and with `keyswap serve --workers 2`."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_oauth2 import ENV, SECRET, Setup, make
from tests.support.processes import BIN, Gateway, free_port, start, start_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture
def first(tmp_path: Path, state_db: str) -> Iterator[Setup]:
    """The authorization server and one gateway on `state_db`, which has a token."""
    yield from started(make(tmp_path, db=state_db))


@pytest.fixture
def short_lease(tmp_path: Path, state_db: str) -> Iterator[Setup]:
    """The same, with a target timeout of 2 s: a refresh's lease lasts 2 + 5 s."""
    yield from started(make(tmp_path, db=state_db, timeout_s=2))


def started(s: Setup) -> Iterator[Setup]:
    try:
        assert s.get().status_code == 200
        yield s
    finally:
        s.gateway.stop()
        s.auth.stop()


def more_gateways(stack: ExitStack, s: Setup, n: int) -> list[Gateway]:
    gateways = [start_gateway(s.config, s.tmp, db=s.db, env=ENV) for _ in range(n)]
    for g in gateways:
        stack.callback(g.stop)
    return gateways


def get(url: str, token: str, path: str = "/echo") -> httpx.Response:
    return httpx.get(f"{url}/api/crm{path}", headers={"x-proxy-token": token}, timeout=60)


def test_three_gateways_fifty_requests_each_make_one_refresh(first: Setup) -> None:
    with ExitStack() as stack:
        urls = [first.gateway.url] + [g.url for g in more_gateways(stack, first, 2)]
        for url in urls:  # every gateway has the current token
            assert get(url, first.token).status_code == 200
        before = int(first.admin("stats")["token_calls"])  # type: ignore[call-overload]
        first.admin("expire")
        jobs = [(url, i) for url in urls for i in range(50)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            statuses = list(pool.map(lambda j: get(j[0], first.token, f"/{j[1]}"), jobs))
        assert [r.status_code for r in statuses] == [200] * 150
        stats = first.admin("stats")
        assert int(stats["token_calls"]) - before == 1  # type: ignore[call-overload]
        assert stats["spent_reused"] == []


def test_a_refresher_paused_past_its_lease_cannot_overwrite_the_newer_token(
    short_lease: Setup,
) -> None:
    """G1 takes the lease and calls the token endpoint, which holds the call; G1 is
    stopped (SIGSTOP) until its lease runs out; G2 refreshes; then the endpoint answers
    G1 (invalid_grant: G2 spent that refresh token) and G1 resumes. G1 must take G2's
    token, not store its error over it, and both go on serving."""
    first = short_lease
    with ExitStack() as stack:
        [second] = more_gateways(stack, first, 1)
        first.admin("expire")
        first.admin("hold")
        with ThreadPoolExecutor(2) as pool:
            paused = pool.submit(get, first.gateway.url, first.token, "/paused")
            time.sleep(1.0)  # G1 has taken the lease and its token call is held
            first.gateway.proc.send_signal(signal.SIGSTOP)
            try:
                # The lease lasts the target's timeout (2 s here) and a 5 s margin.
                time.sleep(8)
                answer = get(second.url, first.token, "/meanwhile")
                assert answer.status_code == 200, answer.text
                first.admin("release")  # G1's call is answered now: its token was spent
                time.sleep(0.5)
            finally:
                first.gateway.proc.send_signal(signal.SIGCONT)
            assert paused.result(timeout=60).status_code == 200
        for url in (first.gateway.url, second.url):
            assert get(url, first.token, "/after").status_code == 200
        stats = first.admin("stats")
        assert stats["token_calls"] == 3  # the first fetch, G1's held call, G2's refresh
        health = httpx.get(f"{first.gateway.url}/_keyswap/health").json()
        assert health["oauth2"]["crm"]["error"] is None
        assert not health["oauth2"]["crm"]["terminal"]


def test_workers_share_one_refresh(tmp_path: Path, state_db: str) -> None:
    s = make(tmp_path, db=state_db)
    s.gateway.stop()  # its place is taken by the workers
    port = free_port()
    cmd = [str(BIN / "keyswap"), "serve", "--config", str(s.config), "--workers", "2"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(s.db)]
    workers = start(cmd, port, tmp_path / "workers.log", ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        assert get(url, s.token).status_code == 200
        before = int(s.admin("stats")["token_calls"])  # type: ignore[call-overload]
        s.admin("expire")
        headers = {"x-proxy-token": s.token, "connection": "close"}  # a new one, any worker

        def one(i: int) -> httpx.Response:
            return httpx.get(f"{url}/api/crm/{i}", headers=headers, timeout=60)

        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(one, range(80)))
        assert [r.status_code for r in answers] == [200] * 80
        assert int(s.admin("stats")["token_calls"]) - before == 1  # type: ignore[call-overload]
        assert s.admin("stats")["spent_reused"] == []
    finally:
        assert workers.stop() == 0
        s.auth.stop()
    assert SECRET not in workers.output()
