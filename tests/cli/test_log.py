"""`keyswap logs`, `stats`, `curl` and `audit` on a database written the way the gateway
writes it, on both backends; `logs --follow` and Ctrl-C in a real process."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keyswap.cli.main import main
from keyswap.state.backends import Backend, open_backend
from keyswap.state.store import audit_row
from keyswap.state.writer import commit
from tests.support.processes import BIN

CONFIG = "/nonexistent/keyswap.yaml"  # the commands read the database named by --db


def row(i: int, **fields: object) -> dict[str, object]:
    return {
        "id": f"{i:026d}",
        "started_at": f"2099-01-01T00:00:{i:02d}.000Z",
        "proxy_id": "demo",
        "method": "GET",
        "path": f"/api/demo/{i}",
        "status": 200,
        "proxy_code": "proxy-access-granted",
        "duration_ms": 10.0 + i,
        "target_url": f"http://127.0.0.1:9911/{i}",
        "request_headers": json.dumps({"accept": "*/*", "authorization": "********"}),
        **fields,
    }


def written(db: str, *rows: dict[str, object]) -> None:
    """Committed as the gateway's writer commits: one batch, one transaction."""
    with open_backend(db) as backend, backend.session() as session:
        commit(session, {"requests": list(rows)})


@pytest.fixture
def db_path(backend: Backend, state_db: str) -> str:
    """A state database (each backend) with three requests and an audit entry."""
    written(state_db, row(1), row(2, status=502, proxy_code="proxy-error"), row(3, proxy_id=None))
    entry = audit_row("edit", "demo", {"set": {"rate_limit": "5/s"}}, actor="ana")
    with backend.session() as session:
        session.insert("audit", [entry])
    return state_db


def run(db_path: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--db", db_path, "--config", CONFIG])


def test_logs_table_and_filters(db_path: str) -> None:
    result = run(db_path, "logs", "--status", "5xx")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "STARTED_AT",
        "ID",
        "PROXY_ID",
        "METHOD",
        "STATUS",
        "PROXY_CODE",
        "DURATION_MS",
        "PATH",
    ]
    assert len(lines) == 2 and "proxy-error" in lines[1]
    bad = run(db_path, "logs", "--since", "yesterday")
    assert bad.exit_code == 1 and "use 15m, 2h, 1d" in bad.output


def test_logs_json_is_one_array_with_documents_not_strings(db_path: str) -> None:
    result = run(db_path, "logs", "--json", "--limit", "2")
    rows = json.loads(result.output)
    assert [r["id"] for r in rows] == [f"{2:026d}", f"{3:026d}"]
    assert rows[0]["request_headers"] == {"accept": "*/*", "authorization": "********"}


def test_stats_json_and_table(db_path: str) -> None:
    stats = json.loads(run(db_path, "stats", "--json").output)
    assert [(s["proxy"], s["requests"]) for s in stats] == [(None, 1), ("demo", 2)]
    assert stats[1]["p50_ms"] == 11.0 and stats[1]["error_rate"] == 0.5
    table = run(db_path, "stats").output.splitlines()
    assert table[1].startswith("(no proxy)") and table[2].startswith("demo ")


def test_audit_json_detail_is_a_document(db_path: str) -> None:
    [entry] = json.loads(run(db_path, "audit", "--json").output)
    assert entry["detail"] == {"set": {"rate_limit": "5/s"}} and entry["actor"] == "ana"
    table = run(db_path, "audit").output
    assert '{"set": {"rate_limit": "5/s"}}' in table


def test_curl_json(db_path: str) -> None:
    result = run(db_path, "curl", f"{1:026d}", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["argv"][:4] == ["curl", "-X", "GET", "http://127.0.0.1:9911/1"]
    assert doc["command"] == run(db_path, "curl", f"{1:026d}").output.strip()
    missing = run(db_path, "curl", "nope", "--json")
    assert missing.exit_code == 1 and missing.output.startswith("Error: no request nope")


class Lines:
    """A process's stdout, line by line, with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        self.reader = threading.Thread(target=lambda: [self.lines.put(x) for x in stdout])
        self.reader.start()

    def next(self, timeout: float = 20) -> str:
        return self.lines.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


@contextmanager
def following(db_path: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """`keyswap logs --follow ARGS` running on the database."""
    cmd = [str(BIN / "keyswap"), "logs", "--follow", *args, "--db", db_path, "--config", CONFIG]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out = Lines(proc)
        try:
            yield proc, out
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            out.reader.join(10)


def interrupted(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C ends it at once, quietly, by SIGINT: a shell shows exit status 130."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == -signal.SIGINT
    assert proc.stderr is not None and proc.stderr.read() == ""  # no "Aborted!"


def test_follow_prints_each_row_once_and_ctrl_c_ends_it_quietly(db_path: str) -> None:
    with following(db_path, "--json", "--limit", "2") as (proc, out):
        assert [json.loads(out.next())["id"] for _ in range(2)] == [f"{2:026d}", f"{3:026d}"]
        assert out.none_within(1.5)  # nothing written: nothing printed again
        written(db_path, row(9))
        written(db_path, row(4))  # started before row 9, written after it
        written(db_path, row(5, proxy_id="other"))
        followed = [json.loads(out.next()) for _ in range(3)]
        assert [r["id"] for r in followed] == [f"{i:026d}" for i in (9, 4, 5)]
        assert followed[0]["request_headers"]["accept"] == "*/*"
        assert out.none_within(1.0)
        interrupted(proc)


def test_follow_as_a_table_keeps_its_columns(db_path: str) -> None:
    with following(db_path, "--proxy", "demo") as (proc, out):
        header, first, second = out.next(), out.next(), out.next()
        written(db_path, row(10, path="/api/demo/a-much-longer-path"))
        later = out.next()
        for line in (first, second, later):  # every column starts where the header's does
            assert line.index(" proxy-") + 1 == header.index("PROXY_CODE")
            assert line.index("/api/demo/") == header.index("PATH")
        interrupted(proc)


def test_a_missing_sqlite_log_says_where_it_looked(tmp_path: Path) -> None:
    result = run(str(tmp_path / "none.db"), "logs")
    assert result.exit_code == 1 and f"no activity log at {tmp_path / 'none.db'}" in result.output


def test_no_output_shows_the_password(pg_url: str, postgres: object) -> None:
    """The commands' output and errors name the database with its password masked."""
    password = pg_url.split(":")[2].split("@")[0]
    outputs = [run(pg_url, *args).output for args in (["logs"], ["stats"], ["audit", "--json"])]
    wrong = pg_url.replace(password, "not-the-password")
    refused = run(wrong, "logs")
    assert refused.exit_code == 1 and "password authentication failed" in refused.output
    assert "postgresql://keyswap:********@127.0.0.1" in refused.output
    for output in [*outputs, refused.output]:
        assert password not in output and "not-the-password" not in output
