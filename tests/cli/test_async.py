"""`keyswap async list|show|retry|cancel` on both backends, on requests stored the way
the gateway stores them: tables and JSON, the states each change is allowed from, the
deadline a retry sets, the audit rows, and clear errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from keyswap.cli.main import main
from keyswap.state import async_queue, migrations
from keyswap.state.async_queue import Outcome
from keyswap.state.backends import Backend, open_backend
from keyswap.state.store import iso, unix
from tests.support import ROOT

NOW = time.time()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The demo config, its proxy with an async policy of its own."""
    text = (ROOT / "config" / "demo.yaml").read_text()
    policy = "    rate_limit: 50/s\n    async: { max_attempts: 5, max_age_s: 600 }\n"
    path = tmp_path / "keyswap.yaml"
    path.write_text(text.replace("    rate_limit: 50/s\n", policy))
    return path


def run(config: Path, db: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config), "--db", db])


def put(
    backend: Backend,
    id: str,
    *,
    created: float,
    proxy_id: str = "demo",
    state: str = "queued",
    **columns: Any,
) -> None:
    """A stored request, then (directly) in `state` with `columns`."""
    with backend.session() as session:
        async_queue.enqueue(
            session,
            id=id,
            proxy_id=proxy_id,
            now=iso(created),
            deadline_at=iso(created + 3600),
            max_attempts=5,
            idempotency_key=f"idem-{id}",
            accepted_request_id=f"req-{id}",
            method="POST",
            path=f"/api/{proxy_id}/orders",
            headers=[(b"content-type", b"application/json")],
            body=b'{"n": 1}',
        )
        changes = {"state": state, **columns}
        sets = ", ".join(f'"{c}" = ?' for c in changes)
        sql = f"update async_requests set {sets} where id = ?"  # noqa: S608 (the test's columns)
        session.execute(sql, [*changes.values(), id])


def answered(backend: Backend, id: str, body: bytes, headers: async_queue.Fields) -> None:
    """A stored request delivered once: leased, and its outcome written."""
    put(backend, id, created=NOW - 60)
    with backend.session() as session:
        [job] = async_queue.lease(session, "gw", iso(NOW), iso(NOW + 30), 10)
        out = Outcome("succeeded", status=200, headers=headers, body=body, body_bytes=len(body))
        assert async_queue.finish(session, job, "gw", iso(NOW), f"req-{id}-1", out)


def stored(backend: Backend, id: str) -> dict[str, Any]:
    with backend.session() as session:
        found = async_queue.get(session, id)
    assert found is not None
    return found


def audit_rows(backend: Backend) -> list[dict[str, Any]]:
    with backend.session() as session:
        rows = session.query("select actor, action, resource, detail from audit order by id")
    return [{**r, "detail": json.loads(r["detail"])} for r in rows]


@pytest.fixture
def queue(backend: Backend) -> Backend:
    """Four requests of two proxies, oldest first: queued, failed, delivering, expired."""
    put(backend, "a1", created=NOW - 400)
    put(backend, "a2", created=NOW - 300, state="failed", attempts=5, last_error="503 from echo")
    put(
        backend,
        "a3",
        created=NOW - 200,
        state="delivering",
        attempts=2,
        lease_owner="gw",
        lease_until=iso(NOW + 30),
    )
    put(backend, "b1", created=NOW - 100, proxy_id="billing", state="expired", attempts=1)
    return backend


def test_list_table_newest_first(queue: Backend, state_db: str, config: Path) -> None:
    result = run(config, state_db, "async", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "CREATED_AT", "ID", "PROXY_ID", "STATE", "ATTEMPTS", "NEXT_ATTEMPT_AT", "METHOD", "PATH",
        "STATUS", "LAST_ERROR",
    ]  # fmt: skip
    assert [line.split()[1] for line in lines[1:]] == ["b1", "a3", "a2", "a1"]
    assert lines[2].split()[2:5] == ["demo", "delivering", "2/5"]
    assert lines[3].endswith("503 from echo")
    assert iso(NOW - 400) in lines[4]  # created, and due since then
    assert lines[4].count(iso(NOW - 400)) == 2


def test_list_filters_and_json(queue: Backend, state_db: str, config: Path) -> None:
    rows = json.loads(run(config, state_db, "async", "list", "--json").output)
    assert [r["id"] for r in rows] == ["b1", "a3", "a2", "a1"]
    assert rows[3]["next_attempt_at"] == iso(NOW - 400)  # queued: when it is due
    assert [r["next_attempt_at"] for r in rows[:3]] == [None, None, None]
    assert (rows[1]["attempts"], rows[1]["max_attempts"], rows[1]["state"]) == (2, 5, "delivering")
    assert "request_body" not in rows[0]

    def ids(*args: str) -> list[str]:
        result = run(config, state_db, "async", "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [r["id"] for r in json.loads(result.output)]

    assert ids("--proxy", "demo") == ["a3", "a2", "a1"]
    assert ids("--state", "failed") == ["a2"]
    assert ids("--proxy", "billing", "--state", "failed") == []
    assert ids("--limit", "2") == ["b1", "a3"]
    bad = run(config, state_db, "async", "list", "--state", "lost")
    assert bad.exit_code == 2 and "'lost' is not one of" in bad.output


def test_show_json_is_the_public_document(backend: Backend, state_db: str, config: Path) -> None:
    answered(backend, "r1", "héllo".encode(), [(b"Content-Type", b"text/plain")])
    result = run(config, state_db, "async", "show", "r1", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown == async_queue.public(stored(backend, "r1"))
    assert list(shown)[:6] == [
        "id",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "response",
    ]
    assert shown["response"]["body"] == "héllo" and shown["response"]["body_encoding"] == "utf-8"
    text = run(config, state_db, "async", "show", "r1")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0] == "r1: succeeded, 1 of 5 attempts"
    assert "  request:      POST /api/demo/orders" in lines
    assert "  log rows:     accepted req-r1, last attempt req-r1-1" in lines
    assert "  response:     200 (6 bytes)" in lines
    assert "    content-type: text/plain" in lines
    assert lines[-1] == "héllo"


def test_show_a_body_that_is_not_utf8(backend: Backend, state_db: str, config: Path) -> None:
    answered(backend, "r1", b"\xff\xfe\x00", [])
    doc = json.loads(run(config, state_db, "async", "show", "r1", "--json").output)
    assert (doc["response"]["body"], doc["response"]["body_encoding"]) == ("//4A", "base64")
    text = run(config, state_db, "async", "show", "r1").output
    assert "the body is not UTF-8: --json shows it in base64" in text


def test_show_a_queued_one_and_an_unknown_one(queue: Backend, state_db: str, config: Path) -> None:
    text = run(config, state_db, "async", "show", "a1").output.splitlines()
    assert text[0] == "a1: queued, 0 of 5 attempts"
    assert f"  next attempt: {iso(NOW - 400)}" in text
    assert not any(line.startswith("  response:") for line in text)
    missing = run(config, state_db, "async", "show", "nope")
    assert missing.exit_code == 1
    assert missing.output == (
        "Error: no async request nope; `keyswap async list` shows the stored ones\n"
    )


def test_retry_a_failed_one(queue: Backend, state_db: str, config: Path) -> None:
    started = time.time()
    result = CliRunner().invoke(
        main,
        ["async", "retry", "a2", "--actor", "ana", "--config", str(config), "--db", state_db],
    )
    assert result.exit_code == 0, result.output
    row = stored(queue, "a2")
    assert (row["state"], row["attempts"]) == ("queued", 0)
    # now plus the proxy's async.max_age_s (600 s)
    assert started - 1 <= unix(row["deadline_at"]) - 600 <= time.time() + 1
    assert started - 1 <= unix(row["next_attempt_at"]) <= time.time() + 1
    assert result.output == (
        f"async request a2 (demo): failed -> queued, up to 5 attempts until {row['deadline_at']}\n"
    )
    assert audit_rows(queue) == [
        {
            "actor": "ana",
            "action": "async-retry",
            "resource": "a2",
            "detail": {
                "proxy_id": "demo",
                "previous_state": "failed",
                "deadline_at": row["deadline_at"],
            },
        }
    ]


def test_retry_of_a_proxy_no_longer_in_the_config_gets_a_day(
    queue: Backend, state_db: str, config: Path
) -> None:
    started = time.time()
    result = run(config, state_db, "async", "retry", "b1")
    assert result.exit_code == 0, result.output
    assert "warning: proxy 'billing' is not in" in result.stderr
    assert "the new deadline uses the default max_age_s (86400 s)" in result.stderr
    assert result.stdout.startswith("async request b1 (billing): expired -> queued")
    row = stored(queue, "b1")
    assert started - 1 <= unix(row["deadline_at"]) - 86400 <= time.time() + 1
    [entry] = audit_rows(queue)
    assert entry["detail"]["previous_state"] == "expired"


def test_retry_with_an_unreadable_config_gets_a_day(
    queue: Backend, state_db: str, tmp_path: Path
) -> None:
    result = run(tmp_path / "missing.yaml", state_db, "async", "retry", "a2")
    assert result.exit_code == 0, result.output
    assert "cannot be loaded" in result.stderr and "(86400 s)" in result.stderr
    assert unix(stored(queue, "a2")["deadline_at"]) - time.time() > 86000


@pytest.mark.parametrize(
    ("id", "message"),
    [
        ("a1", "async request a1 is queued: only a failed or expired one can be retried"),
        (
            "a3",
            "async request a3 is being delivered now (attempt 2 of 5) and cannot be retried",
        ),
        ("nope", "no async request nope; `keyswap async list` shows the stored ones"),
    ],
)
def test_retry_refuses_what_is_not_failed_or_expired(
    queue: Backend, state_db: str, config: Path, id: str, message: str
) -> None:
    before = {r: stored(queue, r) for r in ("a1", "a3")}
    result = run(config, state_db, "async", "retry", id)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {message}")
    assert {r: stored(queue, r) for r in before} == before
    assert audit_rows(queue) == []


def test_cancel_a_queued_one(queue: Backend, state_db: str, config: Path) -> None:
    result = run(config, state_db, "async", "cancel", "a1")
    assert result.exit_code == 0, result.output
    assert result.output == "async request a1 (demo): queued -> cancelled\n"
    assert stored(queue, "a1")["state"] == "cancelled"
    [entry] = audit_rows(queue)
    assert (entry["action"], entry["resource"], entry["detail"]) == (
        "async-cancel",
        "a1",
        {"proxy_id": "demo", "previous_state": "queued"},
    )
    again = run(config, state_db, "async", "cancel", "a1")
    assert again.exit_code == 1
    assert again.output.startswith(
        "Error: async request a1 is cancelled: only a queued one can be cancelled"
    )


@pytest.mark.parametrize(
    ("id", "message"),
    [
        (
            "a3",
            "async request a3 is being delivered now (attempt 2 of 5) and cannot be cancelled;"
            " `keyswap async show a3` shows it",
        ),
        ("a2", "async request a2 is failed: only a queued one can be cancelled"),
        ("nope", "no async request nope"),
    ],
)
def test_cancel_refuses_what_is_not_queued(
    queue: Backend, state_db: str, config: Path, id: str, message: str
) -> None:
    before = stored(queue, "a3"), stored(queue, "a2")
    result = run(config, state_db, "async", "cancel", id)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {message}")
    assert (stored(queue, "a3"), stored(queue, "a2")) == before
    assert audit_rows(queue) == []


def test_a_database_from_before_the_queue(
    state_db: str, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its gateways have not upgraded it yet: it holds no async request, and the
    commands say so rather than fail on a missing table."""
    with open_backend(state_db) as backend:
        with monkeypatch.context() as m:
            m.setattr(migrations, "SCHEMA_VERSION", 3)
            migrations.upgrade(backend)
        with backend.session() as session:
            assert migrations.version(session) == 3
    assert json.loads(run(config, state_db, "async", "list", "--json").output) == []
    for command in ("show", "retry", "cancel"):
        result = run(config, state_db, "async", command, "a1")
        assert result.exit_code == 1
        assert result.output.startswith("Error: no async request a1"), command
    with open_backend(state_db) as backend, backend.session() as session:
        assert migrations.version(session) == 3  # left as it was


def test_no_database(tmp_path: Path, config: Path) -> None:
    result = run(config, str(tmp_path / "none.db"), "async", "list")
    assert result.exit_code == 1 and "no activity log at" in result.output
