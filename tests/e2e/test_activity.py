"""End to end: the activity log of a real gateway under load."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from keyswap.config.tokens import digest, new_token
from tests.support.processes import (
    BIN,
    Gateway,
    Process,
    free_port,
    start_echo_target,
    start_gateway,
)

pytestmark = pytest.mark.e2e

TARGET_SECRET = "activity-target-secret-5b2c"
N = 5_000


def dead_token(token: str) -> str:
    """The dead proxy's token: another well-formed token (only `ks_<43>` is one)."""
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def write_config(tmp: Path, echo: int, token: str) -> Path:
    path = tmp / "keyswap.yaml"
    path.write_text(
        f"""\
version: 1
credentials:
  k: {{ type: header, name: x-api-key, value: "${{env:ACTIVITY_SECRET}}" }}
targets:
  echo: {{ base_url: "http://127.0.0.1:{echo}", credential: k }}
  dead: {{ base_url: "http://127.0.0.1:{free_port()}", credential: k }}
proxies:
  live: {{ target: echo, tokens: [{{ id: web, sha256: {digest(token)} }}] }}
  dead: {{ target: dead, tokens: [{{ id: web, sha256: {digest(dead_token(token))} }}] }}
"""
    )
    return path


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start_echo_target(tmp_path_factory.mktemp("activity-echo"))
    yield process
    process.stop()


def rows(db: Path, sql: str = "select * from requests") -> list[dict[str, object]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def kind(i: int, token: str) -> tuple[str, dict[str, str]]:
    """Mixed traffic: granted, denied (wrong token) and error (dead target)."""
    if i % 5 == 3:
        return "/api/live/denied", {"x-proxy-token": "ks_wrong"}
    if i % 5 == 4:
        return "/api/dead/err", {"x-proxy-token": dead_token(token)}
    return f"/api/live/ok?i={i}", {"x-proxy-token": token}


def test_every_flow_gets_exactly_one_row(tmp_path: Path, echo: Process) -> None:
    token = new_token()
    config = write_config(tmp_path, echo.port, token)
    gateway = start_gateway(config, tmp_path, extra=["-q"], env={"ACTIVITY_SECRET": TARGET_SECRET})
    db = Path(str(config.parent / f"keyswap-{gateway.port}.db"))
    ids: dict[str, int] = {}
    reader_counts: list[int] = []

    def one(i: int, client: httpx.Client) -> None:
        path, headers = kind(i, token)
        r = client.get(path, headers=headers)
        ids[r.headers["keyswap-request-id"]] = r.status_code

    def read_while_writing() -> None:
        # a second process reads while the gateway writes (WAL)
        for _ in range(5):
            out = subprocess.run(
                [str(BIN / "sqlite-utils"), str(db), "select count(*) as n from requests"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            reader_counts.append(json.loads(out.stdout)[0]["n"])

    try:
        reader = threading.Thread(target=read_while_writing)
        with ThreadPoolExecutor(8) as pool:
            clients = [httpx.Client(base_url=gateway.url, timeout=30) for _ in range(8)]
            futures = [pool.submit(one, i, clients[i % 8]) for i in range(N)]
            reader.start()
            for f in futures:
                f.result()
            for c in clients:
                c.close()
        reader.join()
    finally:
        assert gateway.stop() == 0
    assert len(ids) == N
    logged = {r["id"]: r for r in rows(db)}
    assert len(logged) == N and set(logged) == set(ids)
    assert len(reader_counts) == 5 and all(isinstance(n, int) for n in reader_counts)

    by_kind: dict[str, list[dict[str, object]]] = {}
    for row in logged.values():
        by_kind.setdefault(str(row["proxy_code"]), []).append(row)
    assert len(by_kind["proxy-access-granted"]) == N * 3 // 5
    assert len(by_kind["proxy-access-denied"]) == N // 5
    assert len(by_kind["proxy-error"]) == N // 5
    ok = by_kind["proxy-access-granted"][0]
    assert ok["status"] == 200 and ok["proxy_id"] == "live" and ok["token_id"] == "web"
    assert str(ok["path"]).startswith("/api/live/ok?i=")
    assert str(ok["target_url"]).startswith(f"http://127.0.0.1:{echo.port}/ok?i=")
    assert ok["method"] == "GET" and ok["client_ip"] == "127.0.0.1" and ok["attempts"] == 1
    assert ok["environment"] == "dev" and ok["bytes_out"] and float(ok["duration_ms"]) > 0  # type: ignore[arg-type]
    assert json.loads(str(ok["request_headers"]))["x-api-key"] == "********"
    denied = by_kind["proxy-access-denied"][0]
    assert denied["status"] == 401 and denied["target_url"] is None
    assert json.loads(str(denied["request_headers"]))["x-proxy-token"] == "********"
    error = by_kind["proxy-error"][0]
    assert error["status"] == 502 and "Connect call failed" in str(error["error"])

    # no secret anywhere the gateway wrote
    data = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for secret in (TARGET_SECRET, token):
        assert secret.encode() not in data
        assert secret not in gateway.output()
    logs = subprocess.run(
        [str(BIN / "keyswap"), "logs", "--db", str(db), "--json", "--limit", str(N)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert len(json.loads(logs)) == N  # --json: one array
    assert TARGET_SECRET not in logs and token not in logs


def test_sigterm_under_load_keeps_every_completed_flow(tmp_path: Path, echo: Process) -> None:
    token = new_token()
    config = write_config(tmp_path, echo.port, token)
    gateway: Gateway = start_gateway(
        config, tmp_path, extra=["-q"], env={"ACTIVITY_SECRET": TARGET_SECRET}
    )
    db = config.parent / f"keyswap-{gateway.port}.db"
    completed: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            for i in range(20_000):
                if stop.is_set():
                    return
                try:
                    r = client.get(f"/api/live/x?i={i}", headers={"x-proxy-token": token})
                except httpx.HTTPError:
                    return
                completed.append(r.headers["keyswap-request-id"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    while len(completed) < 500:
        threading.Event().wait(0.05)
    health = httpx.get(f"{gateway.url}/_keyswap/health").json()["activity_log"]
    assert health["rows_written"] > 0 and health["rows_dropped"] == 0
    assert {"queue_depth", "db", "write_failures"} <= set(health)
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(30) == 0
    stop.set()
    for t in threads:
        t.join(30)
    logged = {r["id"] for r in rows(db, "select id from requests")}
    missing = set(completed) - logged
    assert not missing, f"{len(missing)} completed flows have no row"
