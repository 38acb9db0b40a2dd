"""SIGTERM under load: the requests in flight are answered, each gets its log row, and
the gateway exits cleanly (no traceback)."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import start_echo_target, start_gateway

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("round_", range(3))
def test_sigterm_under_load_answers_every_accepted_request(tmp_path: Path, round_: int) -> None:
    echo = start_echo_target(tmp_path)
    token = new_token()
    config = tmp_path / "keyswap.yaml"
    config.write_text(
        f"""\
version: 1
credentials:
  key: {{ type: bearer, token: "${{env:SHUTDOWN_SECRET}}" }}
targets:
  echo: {{ base_url: "http://127.0.0.1:{echo.port}", credential: key }}
proxies:
  p: {{ target: echo, tokens: [{{ id: t, sha256: {digest(token)} }}] }}
"""
    )
    db = tmp_path / "keyswap.db"
    gateway = start_gateway(config, tmp_path, db=db, env={"SHUTDOWN_SECRET": "s3cr3t-shutdown"})
    answers: list[httpx.Response] = []
    refused: list[Exception] = []
    stop = threading.Event()

    def client(slow: bool) -> None:
        with httpx.Client(headers={"x-proxy-token": token}, timeout=30) as http:
            while not stop.is_set():
                path = "/slow?s=1" if slow else "/anything"
                try:
                    answers.append(http.get(f"{gateway.url}/api/p{path}"))
                except httpx.TransportError as e:  # not accepted: the listener is closed
                    refused.append(e)
                    return

    in_flight: list[httpx.Response | Exception] = []

    def slow_request() -> None:
        try:
            url = f"{gateway.url}/api/p/slow?s=2"
            in_flight.append(httpx.get(url, headers={"x-proxy-token": token}, timeout=30))
        except httpx.HTTPError as e:
            in_flight.append(e)

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(6)]
    slow = [threading.Thread(target=slow_request) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5 + round_ * 0.3)
        for t in slow:
            t.start()
        time.sleep(0.7)  # the four slow requests are at the target now
        gateway.proc.send_signal(signal.SIGTERM)
        code = gateway.proc.wait(30)
    finally:
        stop.set()
        for t in [*threads, *slow]:
            t.join(30)
        gateway.stop()
        echo.stop()
    assert len(in_flight) == 4
    cut = [r for r in in_flight if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert not cut, f"requests in flight at SIGTERM were not answered: {cut}"
    answers += [r for r in in_flight if isinstance(r, httpx.Response)]
    output = gateway.output()
    assert code == 0, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    assert answers, "no request was answered"
    statuses = {r.status_code for r in answers}
    assert statuses <= {200, 503}, statuses
    with closing(sqlite3.connect(db)) as conn:
        logged = {row[0] for row in conn.execute("select id from requests")}
    answered = {r.headers["keyswap-request-id"] for r in answers}
    assert answered <= logged, f"{len(answered - logged)} answered requests have no row"
