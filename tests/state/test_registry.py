"""The registry of live gateways on both backends: a gateway registers, its heartbeat
keeps its row fresh (and says at once what it serves after a reload), a clean stop
removes it, and a gateway that went silent is no longer live."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyswap.state import registry
from keyswap.state.backends import Backend
from keyswap.state.registry import Gateway, Registration, live_gateways
from keyswap.state.store import iso

LISTEN = [{"mode": "reverse", "address": "127.0.0.1:8080"}]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "keyswap.yaml"
    path.write_text("version: 1\n")
    return path


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats every 50 ms, live for 150 ms."""
    monkeypatch.setattr(registry, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(registry, "LIVE_WITHIN_S", 0.15)


def row_of(backend: Backend, gateway_id: str) -> dict[str, object]:
    with backend.session() as session:
        [row] = session.query("select * from gateways where id = ?", [gateway_id])
    return row


def test_a_gateway_registers_beats_and_leaves(
    backend: Backend, config: Path, fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = ["digest-1"]
    gateway = Registration(backend, config, LISTEN, lambda: served[0])
    gateway.start()
    try:
        [live] = live_gateways(backend, config)
        assert live.id == gateway.id == f"{socket.gethostname()}:{os.getpid()}:{live.id[-6:]}"
        assert (live.node, live.pid, live.config) == (
            socket.gethostname(),
            os.getpid(),
            str(config.resolve()),
        )
        assert (live.listen, live.config_digest) == (LISTEN, "digest-1")
        assert json.loads(str(row_of(backend, gateway.id)["listen"])) == LISTEN
        first = live.last_seen
        time.sleep(0.3)  # beyond LIVE_WITHIN_S: only the heartbeat keeps it live
        [live] = live_gateways(backend, config)
        assert live.last_seen > first
        served[0] = "digest-2"  # a reload: the row says so at once, not a heartbeat later
        monkeypatch.setattr(registry, "HEARTBEAT_S", 60)
        time.sleep(0.06)  # the thread now waits a minute
        gateway.refresh()
        deadline = time.monotonic() + 2
        while row_of(backend, gateway.id)["config_digest"] != "digest-2":
            assert time.monotonic() < deadline, "the refresh was not written"
            time.sleep(0.01)
    finally:
        gateway.stop()
    with backend.session() as session:
        assert session.query("select * from gateways") == []
    assert live_gateways(backend, config) == []


def test_only_gateways_of_the_same_config_are_listed(
    backend: Backend, config: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    ours, theirs = (Registration(backend, c, LISTEN, lambda: "d") for c in (config, other))
    ours.start()
    theirs.start()
    try:
        assert [g.id for g in live_gateways(backend, config)] == [ours.id]
        assert [g.id for g in live_gateways(backend, other)] == [theirs.id]
    finally:
        ours.stop()
        theirs.stop()


def silent(gateway_id: str, seconds_ago: float, pid: int, node: str) -> dict[str, object]:
    return {
        "id": gateway_id,
        "node": node,
        "pid": pid,
        "listen": json.dumps(LISTEN),
        "config": "",  # set by the test
        "config_digest": "d",
        "started_at": iso(time.time() - 3600),
        "last_seen": iso(time.time() - seconds_ago),
    }


def test_a_silent_gateway_is_not_live(backend: Backend, config: Path) -> None:
    """A row whose heartbeat stopped (a killed or frozen process) is no longer live; a
    day later a registering gateway removes it."""
    rows = [
        silent("fresh", 1, os.getpid(), "node-b"),
        silent("stale", registry.LIVE_WITHIN_S + 1, os.getpid(), "node-b"),
        silent("forgotten", registry.FORGET_AFTER_S + 60, os.getpid(), "node-b"),
    ]
    with backend.session() as session:
        session.insert("gateways", [{**r, "config": str(config.resolve())} for r in rows])
    assert [g.id for g in live_gateways(backend, config)] == ["fresh"]
    gateway = Registration(backend, config, LISTEN, lambda: "d")
    gateway.start()
    gateway.stop()
    with backend.session() as session:
        left = {r["id"] for r in session.query("select id from gateways")}
    assert left == {"fresh", "stale"}


def test_on_sqlite_a_gateway_whose_process_is_gone_is_not_live(
    backend: Backend, config: Path
) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    row = silent("dead", 1, int(gone.stdout), socket.gethostname())
    with backend.session() as session:
        session.insert("gateways", [{**row, "config": str(config.resolve())}])
    found = [g.id for g in live_gateways(backend, config)]
    # one machine: the pid says it is gone; across nodes only the heartbeat can
    assert found == ([] if backend.kind == "sqlite" else ["dead"])


@pytest.mark.parametrize(
    ("node", "address", "url"),
    [
        (socket.gethostname(), "127.0.0.1:8080", "http://127.0.0.1:8080"),
        (socket.gethostname(), "0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("gw-2.internal", "0.0.0.0:8080", "http://gw-2.internal:8080"),
        ("gw-2.internal", "[::]:8080", "http://gw-2.internal:8080"),
        ("gw-2.internal", "[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_where_a_gateway_is_reached(node: str, address: str, url: str) -> None:
    listen = [
        {"mode": "forward", "address": "127.0.0.1:1"},
        {"mode": "reverse", "address": address},
    ]
    gateway = Gateway("x", node, 1, listen, "/c.yaml", "d", "", "")
    assert gateway.url() == gateway.url("reverse") == url
    assert gateway.url("forward") == "http://127.0.0.1:1"
    assert Gateway("x", node, 1, listen[:1], "/c.yaml", "d", "", "").url() is None
    reverse_only = Gateway("x", node, 1, listen[1:], "/c.yaml", "d", "", "")
    assert reverse_only.url("forward") is None


def test_the_heartbeat_says_how_the_backend_answers(
    backend: Backend, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = Registration(backend, config, LISTEN, lambda: "d")
    gateway.start()
    try:
        report = gateway.report()
        assert report["kind"] == backend.kind and report["reachable"] is True
        assert report["latency_ms"] is not None and report["error"] is None
        # A heartbeat that hangs (the database stopped answering) is no news of health.
        later = time.monotonic() + registry.STALE_S + 1
        monkeypatch.setattr(registry.time, "monotonic", lambda: later)
        report = gateway.report()
        assert report["reachable"] is False and "no heartbeat written" in report["error"]
    finally:
        gateway.stop()
