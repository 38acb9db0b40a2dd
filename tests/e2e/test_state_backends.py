"""End to end: gateways on a state backend they share. A gateway on PostgreSQL writes its
rows there and the command line reads them back; two gateways on one config and one
backend (each backend) are both waited for after a change, and one that is stopped is
named. The PostgreSQL password shows nowhere: no output, log or row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyswap.config.loader import load_config
from keyswap.config.tokens import new_token
from keyswap.state.backends import open_backend
from keyswap.state.migrations import SCHEMA_VERSION
from tests.e2e.test_manage import ENV, write_config
from tests.support.postgres import Postgres
from tests.support.processes import BIN, Gateway, free_port, start_echo_target, start_gateway

pytestmark = pytest.mark.e2e


class Commands:
    """`keyswap ...` on one config and database, keeping every output."""

    def __init__(self, config: Path, db: str) -> None:
        self.config, self.db = config, db
        self.outputs: list[str] = []

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "keyswap"), *args, "--config", str(self.config), "--db", self.db]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env={**os.environ, **ENV}
        )
        self.outputs += [done.stdout, done.stderr]
        return done

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def eventually[T](check: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.2)


def registered(keyswap: Commands, *gateways: Gateway) -> dict[int, str]:
    """Once `keyswap gateways` lists these gateways: their registry ids by pid."""
    pids = {g.proc.pid for g in gateways}

    def listed() -> dict[int, str] | None:
        found = {g["pid"]: g["id"] for g in keyswap.json("gateways")}
        return found if set(found) == pids else None

    return eventually(listed)


def echo_config(stack: ExitStack, tmp: Path, token: str) -> Path:
    """A config for the echo target, which runs until `stack` closes."""
    target = start_echo_target(tmp)
    stack.callback(target.stop)
    return write_config(tmp, target.url, token)


def gateway_on(stack: ExitStack, config: Path, tmp: Path, db: str, plain: bool = False) -> Gateway:
    """A gateway on `db`, stopped when `stack` closes (if it is still running)."""
    gateway = start_gateway(config, tmp, db=db, env=ENV, plain_mitmdump=plain)
    stack.callback(gateway.stop)
    return gateway


def test_a_gateway_on_postgresql(tmp_path: Path, postgres: Postgres, pg_url: str) -> None:
    token = new_token()
    with ExitStack() as stack:
        config = echo_config(stack, tmp_path, token)
        gateway = gateway_on(stack, config, tmp_path, pg_url)
        keyswap = Commands(config, pg_url)
        gateway_id = registered(keyswap, gateway)[gateway.proc.pid]
        assert gateway_id.split(":")[1] == str(gateway.proc.pid)

        for path in ("/a", "/b", "/c"):
            granted = httpx.get(f"{gateway.url}/api/app{path}", headers={"x-proxy-token": token})
            assert granted.status_code == 200
        denied = httpx.get(f"{gateway.url}/api/app/d", headers={"x-proxy-token": "ks_wrong"})
        assert denied.status_code == 401
        rows = eventually(lambda: (r := keyswap.json("logs")) and len(r) == 4 and r)
        assert {(r["mode"], r["gateway"]) for r in rows} == {("reverse", gateway_id)}
        assert denied.headers["keyswap-request-id"] in {r["id"] for r in rows}
        assert "seq" not in rows[0]  # PostgreSQL's commit order stays inside
        [stats] = keyswap.json("stats")
        assert (stats["proxy"], stats["requests"], stats["denied"]) == ("app", 4, 1)
        assert stats["success_rate"] == 0.75 and stats["p50_ms"] > 0
        assert keyswap("curl", rows[0]["id"]).stdout.startswith("curl -X GET")
        health = httpx.get(f"{gateway.url}/_keyswap/health").text
        assert json.loads(health)["activity_log"]["db"] == pg_url.replace(
            postgres.password, "********"
        )
        assert "already current" in keyswap("db", "upgrade").stdout
        dashboard = keyswap("dashboard")
        assert dashboard.returncode == 1 and "is PostgreSQL" in dashboard.stderr

        assert gateway.stop() == 0
        assert keyswap.json("gateways") == []  # a clean stop removes its row
        log = gateway.output()
        assert "keyswap: activity log in postgresql://keyswap:********@127.0.0.1" in log

    with open_backend(pg_url) as backend, backend.session() as session:
        tables = ("requests", "audit", "gateways", "oauth2_tokens", "rate_limits")
        stored = json.dumps([session.query(f"select * from {t}") for t in tables])  # noqa: S608
    for where, text in [*enumerate(keyswap.outputs), ("log", log), ("health", health)]:
        assert postgres.password not in text, where
    assert postgres.password not in stored


def test_a_change_waits_for_every_gateway_and_names_a_stopped_one(
    tmp_path: Path, state_db: str
) -> None:
    """rotate-token with three live gateways (two `keyswap serve`, one plain mitmdump)
    sharing one backend, one of them stopped (SIGSTOP) while the command waits: the
    command names the two that serve the change and the one that does not; the old
    token is refused by the two at once and by the third once it runs again."""
    old = new_token()
    with ExitStack() as stack:
        config = echo_config(stack, tmp_path, old)
        first = gateway_on(stack, config, tmp_path, state_db)
        second = gateway_on(stack, config, tmp_path, state_db, plain=True)
        third = gateway_on(stack, config, tmp_path, state_db)
        keyswap = Commands(config, state_db)
        ids = registered(keyswap, first, second, third)
        assert keyswap("gateways").returncode == 0  # one config served everywhere
        for g in (first, second, third):
            assert status(g, old) == 200

        os.kill(second.proc.pid, signal.SIGSTOP)
        try:
            rotated = keyswap("proxies", "rotate-token", "app")
            # the two running gateways refuse the old token as soon as the command returns
            assert [status(g, old) for g in (first, third)] == [401, 401]
        finally:
            os.kill(second.proc.pid, signal.SIGCONT)
        assert rotated.returncode == 0, rotated.stderr
        out = rotated.stdout
        for g in (first, third):
            assert f"gateway {ids[g.proc.pid]} at {g.url} serves the change" in out
        assert (
            f"warning: gateway {ids[second.proc.pid]} at {second.url} has not loaded the"
            " change within 5 s"
        ) in out
        new = out.strip().splitlines()[-1].rsplit(" ", 1)[1]
        # Running again, the second loads the change within 2 s, like the others.
        started = time.monotonic()
        eventually(lambda: status(second, old) == 401 or None, timeout=10)
        assert time.monotonic() - started < 3
        assert [status(g, new) for g in (first, second, third)] == [200, 200, 200]
        digest = load_config(config, environ=ENV).digest

        def caught_up() -> bool:
            listed = keyswap.json("gateways")
            return len(listed) == 3 and all(g["config_digest"] == digest for g in listed)

        eventually(caught_up)
        assert keyswap("gateways").returncode == 0


def status(gateway: Gateway, token: str) -> int:
    r = httpx.get(f"{gateway.url}/api/app/x", headers={"x-proxy-token": token}, timeout=10)
    return r.status_code


def test_a_gateway_refuses_a_database_of_a_newer_version(tmp_path: Path) -> None:
    db = tmp_path / "keyswap.db"
    with open_backend(db) as backend, backend.session() as session:
        session.execute("pragma user_version = 9")
    config = write_config(tmp_path, "http://127.0.0.1:9", new_token())
    serve = [str(BIN / "keyswap"), "serve", "--config", str(config), "--db", str(db)]
    done = subprocess.run(
        [*serve, "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert done.returncode != 0
    assert (
        f"has schema version 9, newer than this keyswap knows ({SCHEMA_VERSION})"
        in done.stdout + done.stderr
    )
