"""`keyswap serve --workers N`: N gateway processes on one port (SO_REUSEPORT), under a
supervisor that restarts a worker that dies, stops them all cleanly on SIGTERM, and gives
up when they cannot start. Real processes on loopback; the pid in each health report
tells the workers apart."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from keyswap.cli.main import main
from keyswap.cli.workers import Supervisor, WorkersFailed, cores, parse_workers
from keyswap.config.tokens import digest, new_token
from tests.support import ROOT
from tests.support.processes import (
    BIN,
    GATEWAY_SCRIPT,
    Process,
    free_port,
    start,
    start_echo_target,
)

SECRET = "s3cr3t-workers"
DEMO = str(ROOT / "config" / "demo.yaml")


# --- parsing --workers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "count"), [("1", 1), ("4", 4), (" 2 ", 2), ("auto", cores()), ("AUTO", cores())]
)
def test_workers_parses(value: str, count: int) -> None:
    assert parse_workers(value) == count


def test_auto_is_one_per_core_this_process_may_use() -> None:
    assert cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "at least 1 worker"),
        ("-1", "not a number of workers"),
        ("1.5", "not a number of workers"),
        ("two", "not a number of workers"),
        ("", "not a number of workers"),
    ],
)
def test_workers_refuses(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_workers(value)


@pytest.mark.parametrize("value", ["0", "junk"])
def test_serve_refuses_a_bad_workers_value_before_anything_starts(value: str) -> None:
    done = CliRunner().invoke(main, ["serve", "--config", DEMO, "--workers", value])
    assert done.exit_code == 2
    assert "Invalid value for '--workers'" in done.output, done.output


def test_web_with_several_workers_is_refused() -> None:
    done = CliRunner().invoke(main, ["serve", "--web", "--workers", "2", "--config", DEMO])
    assert done.exit_code == 2
    assert "--web" in done.output and "--workers 1" in done.output, done.output


def test_workers_set_reuse_port_themselves() -> None:
    done = CliRunner().invoke(
        main,
        ["serve", "--workers", "2", "--config", DEMO, "--", "--set", "keyswap_reuse_port=true"],
    )
    assert done.exit_code == 2
    assert "--workers sets keyswap_reuse_port itself" in done.output, done.output


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0"])
def test_port_0_is_refused(listen: str) -> None:
    """Workers must share one port; a port picked at random would differ per worker."""
    done = CliRunner().invoke(
        main, ["serve", "--workers", "2", "--listen", listen, "--config", DEMO]
    )
    assert done.exit_code == 2 and "is not HOST:PORT" in done.output, done.output


# --- the supervisor, over small stand-in workers -----------------------------------------

# A stand-in worker: lives until SIGTERM, then exits 0 as a gateway does.
SLEEPER = [
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "time.sleep(60)",
]


def test_a_dead_worker_is_restarted_and_sigterm_stops_them_all() -> None:
    said: list[str] = []

    def say(message: str) -> None:
        said.append(message)
        if message.startswith("worker 2 started"):  # both up: kill the first
            os.kill(int(said[0].rsplit(" ", 1)[1]), signal.SIGKILL)
        elif "restarted" in message:
            os.kill(os.getpid(), signal.SIGTERM)  # as a service manager stops it

    assert Supervisor(SLEEPER, 2, say).run() == 0
    assert said[0].startswith("worker 1 started: pid ")
    assert "worker 1 (pid " in said[2] and "was killed by SIGKILL" in said[2]
    assert "restarting in 0.5 s" in said[2]  # it died at once: a pause before the restart
    assert said[3].startswith("worker 1 restarted: pid ")
    assert said[-1] == "SIGTERM: stopping the workers"


def test_workers_that_die_at_once_make_it_give_up() -> None:
    said: list[str] = []
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(WorkersFailed, match="3 times in a row and no worker is serving"):
        Supervisor(failing, 2, said.append).run()
    assert any("exited with status 3" in m and "restarting in 1 s" in m for m in said), said


# --- real processes ----------------------------------------------------------------------


@dataclass
class Pool:
    """A running `keyswap serve --workers N`, its target and its database."""

    supervisor: Process
    echo: Process
    db: Path
    token: str
    pids: set[int] = field(default_factory=set)

    def get(self, path: str, timeout: float = 30) -> httpx.Response:
        """A request on a fresh connection, so the kernel picks a worker each time."""
        headers = {"x-proxy-token": self.token}
        return httpx.get(f"{self.supervisor.url}{path}", headers=headers, timeout=timeout)

    def health_pid(self) -> int:
        return int(httpx.get(f"{self.supervisor.url}/_keyswap/health", timeout=10).json()["pid"])

    def wait_for_workers(
        self, count: int, timeout: float = 30, exclude: frozenset[int] = frozenset()
    ) -> set[int]:
        """The pids of `count` workers answering, seen over fresh connections."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = self.health_pid()
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if pid not in exclude:
                seen.add(pid)
            if len(seen) >= count:
                return seen
        raise AssertionError(
            f"saw {sorted(seen)} within {timeout} s, not {count} workers\n{self.supervisor.output()}"
        )

    def rows(self) -> set[str]:
        with closing(sqlite3.connect(self.db)) as conn:
            return {row[0] for row in conn.execute("select id from requests")}

    def stop(self) -> None:
        self.supervisor.stop()
        self.echo.stop()


def config(tmp: Path, echo_port: int, token: str) -> Path:
    path = tmp / "keyswap.yaml"
    path.write_text(
        f"""\
version: 1
credentials:
  key: {{ type: bearer, token: "${{env:WORKERS_SECRET}}" }}
targets:
  echo: {{ base_url: "http://127.0.0.1:{echo_port}", credential: key }}
proxies:
  p: {{ target: echo, tokens: [{{ id: t, sha256: {digest(token)} }}] }}
"""
    )
    return path


def serve_workers(tmp: Path, workers: int = 2) -> Pool:
    echo = start_echo_target(tmp)
    token = new_token()
    path, db, port = config(tmp, echo.port, token), tmp / "keyswap.db", free_port()
    cmd = [str(BIN / "keyswap"), "serve", "--workers", str(workers), "--config", str(path)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(db), "--", "--set", "flow_detail=0"]
    try:
        supervisor = start(cmd, port, tmp / "supervisor.log", {"WORKERS_SECRET": SECRET})
    except Exception:
        echo.stop()
        raise
    pool = Pool(supervisor, echo, db, token)
    try:
        pool.pids = pool.wait_for_workers(workers)
    except Exception:
        pool.stop()
        raise
    return pool


def assert_clean(output: str) -> None:
    assert "Traceback" not in output and "CancelledError" not in output, output


@pytest.mark.e2e
def test_two_workers_share_the_port_and_log_every_request(tmp_path: Path) -> None:
    pool = serve_workers(tmp_path)
    try:
        assert len(pool.pids) == 2 and pool.supervisor.proc.pid not in pool.pids
        answers = [pool.get("/api/p/anything") for _ in range(60)]
        assert {r.status_code for r in answers} == {200}
        assert all(r.json()["headers"]["authorization"] == f"Bearer {SECRET}" for r in answers)
        code = pool.supervisor.stop()
    finally:
        pool.stop()
    output = pool.supervisor.output()
    assert code == 0, output
    assert_clean(output)
    for pid in pool.pids:
        assert f"pid {pid}" in output, output  # the supervisor says which workers it started
    answered = {r.headers["keyswap-request-id"] for r in answers}
    assert answered == pool.rows(), "the activity log has other rows than the answered requests"


@pytest.mark.e2e
def test_a_killed_worker_is_restarted_while_the_other_keeps_answering(tmp_path: Path) -> None:
    pool = serve_workers(tmp_path)
    victim, survivor = sorted(pool.pids)
    ok: list[tuple[float, str]] = []  # (answered at, request id)
    failed: list[tuple[float, str]] = []  # (sent at, error)
    bad: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = pool.get("/api/p/anything", timeout=10)
            except httpx.TransportError as e:
                failed.append((sent, repr(e)))
                continue
            if r.status_code == 200:
                ok.append((time.monotonic(), r.headers["keyswap-request-id"]))
            else:
                bad.append(r)

    clients = [threading.Thread(target=load) for _ in range(2)]
    try:
        for t in clients:
            t.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.0)
        after_kill = pool.wait_for_workers(1, exclude=frozenset({victim}))
        restarted = pool.wait_for_workers(1, timeout=30, exclude=frozenset({victim, survivor}))
        time.sleep(1.0)  # load on the restarted worker too
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    code = pool.supervisor.stop()
    pool.echo.stop()
    output = pool.supervisor.output()
    assert after_kill == {survivor}, output
    (new_pid,) = restarted
    assert f"(pid {victim}) was killed by SIGKILL" in output, output
    assert f"restarted: pid {new_pid}" in output, output
    assert code == 0, output
    assert not bad, [(r.status_code, r.text) for r in bad]
    # Only connections the killed worker held may fail: those open or queued at the kill.
    late = [f for f in failed if f[0] > killed_at + 0.5]
    assert not late, f"requests sent after the kill failed: {late}"
    assert len(failed) <= 4, failed
    logged = pool.rows()
    lost = [(at, rid) for at, rid in ok if rid not in logged]
    report = (
        f"{len(ok)} answered, {len(failed)} failed at the kill, "
        f"{len(lost)} answered rows lost with the killed worker"
    )
    print(report)
    # A SIGKILL loses what the killed writer had not committed: its last linger window.
    assert all(killed_at - 1.0 < at <= killed_at + 0.1 for at, _ in lost), report
    assert len(ok) > 50, report


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_drains_every_worker_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    pool = serve_workers(tmp_path)
    results: list[httpx.Response | Exception] = []

    def slow() -> None:
        try:
            results.append(pool.get("/api/p/slow?s=2"))
        except httpx.HTTPError as e:
            results.append(e)

    # 12 fresh connections: the kernel puts them all on one worker with p = 2 / 2**12.
    requests = [threading.Thread(target=slow) for _ in range(12)]
    try:
        for t in requests:
            t.start()
        time.sleep(0.8)  # at the target now
        pool.supervisor.proc.send_signal(sig)
        code = pool.supervisor.proc.wait(30)
    finally:
        for t in requests:
            t.join(30)
        pool.stop()
    output = pool.supervisor.output()
    cut = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert len(results) == 12 and not cut, (
        f"requests in flight at SIGTERM were cut: {cut}\n{output}"
    )
    assert code == 0, output
    assert_clean(output)
    assert f"{sig.name}: stopping the workers" in output
    # each worker drained its own (and said so)
    assert output.count("keyswap: shutting down,") == 2, output
    answered = {r.headers["keyswap-request-id"] for r in results if isinstance(r, httpx.Response)}
    assert answered <= pool.rows(), "answered requests without a row"


@pytest.mark.e2e
def test_workers_that_cannot_bind_make_the_supervisor_give_up(tmp_path: Path) -> None:
    echo = start_echo_target(tmp_path)
    try:
        path = config(tmp_path, echo.port, new_token())
        with socket.socket() as taken:  # another program, without SO_REUSEPORT
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            started = time.monotonic()
            cmd = [str(BIN / "keyswap"), "serve", "--workers", "2", "--config", str(path)]
            cmd += ["--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "k.db")]
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "WORKERS_SECRET": SECRET},
            )
            took = time.monotonic() - started
    finally:
        echo.stop()
    output = done.stdout + done.stderr  # mitmdump logs on stdout
    assert done.returncode == 1, output
    assert "address already in use" in output, output
    assert "giving up" in done.stderr and "Error: worker" in done.stderr, output
    assert took < 60, f"took {took:.0f} s to give up"
    assert_clean(output)


@pytest.mark.e2e
def test_an_invalid_config_stops_serve_before_any_worker(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(BIN / "keyswap"),
            "serve",
            "--workers",
            "2",
            "--config",
            "tests/broken/dangling-refs.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "is invalid (3 errors)" in done.stderr, done.stderr
    assert "worker" not in done.stderr, done.stderr


@pytest.mark.e2e
def test_serve_processes_with_reuse_port_share_a_port(tmp_path: Path) -> None:
    """The recipe for several gateways without the supervisor: each `keyswap serve ...
    -- --set keyswap_reuse_port=true` on the same port (plain `mitmdump -s` cannot: it
    binds before it loads the gateway, and says so)."""
    echo = start_echo_target(tmp_path)
    token = new_token()
    path, port = config(tmp_path, echo.port, token), free_port()
    env = {"WORKERS_SECRET": SECRET}
    cmd = [str(BIN / "keyswap"), "serve", "--config", str(path), "--listen", f"127.0.0.1:{port}"]
    cmd += ["--db", str(tmp_path / "keyswap.db"), "--", "--set", "keyswap_reuse_port=true"]
    gateways: list[Process] = []
    try:
        for i in range(2):
            gateways.append(start(cmd, port, tmp_path / f"gw{i}.log", env))
        pool = Pool(gateways[0], echo, tmp_path / "keyswap.db", token)
        assert pool.wait_for_workers(2) == {g.proc.pid for g in gateways}
        mode = f"reverse:http://unused.invalid@{free_port()}"
        plain_cmd = [str(BIN / "mitmdump"), "-s", str(GATEWAY_SCRIPT), "--mode", mode]
        plain_cmd += ["--listen-host", "127.0.0.1", "--set", f"keyswap_config={path}"]
        plain_cmd += [
            "--set",
            f"keyswap_db={tmp_path / 'plain.db'}",
            "--set",
            "keyswap_reuse_port=true",
        ]
        plain = subprocess.run(
            plain_cmd,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
    finally:
        for g in gateways:
            g.stop()
        echo.stop()
    assert plain.returncode == 1, plain.stdout + plain.stderr
    assert "keyswap_reuse_port could not take effect" in plain.stdout + plain.stderr
