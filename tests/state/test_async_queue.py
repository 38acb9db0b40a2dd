"""The async queue on both backends: a stored request round-trips byte for byte, a lease
is exclusive while its holder lives and its time runs, an outcome is written only by the
lease's holder for its attempt, the sweep ends what can no longer be delivered, retry,
cancel and prune touch only the states they name, and concurrent sessions never lease
one request twice."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import pytest

from keyswap.state import async_queue
from keyswap.state.async_queue import Job, Outcome
from keyswap.state.backends import Backend, Session
from keyswap.state.store import iso

T0 = 1_800_000_000.0  # a Unix time in 2027
LIVE_S = 9.0  # registry.LIVE_WITHIN_S: a gateway seen within this is live

HEADERS = [
    (b"content-type", b"application/octet-stream"),
    (b"x-latin", b"caf\xe9 \xff\x80"),  # not UTF-8: every byte kept
    (b"x-twice", b"1"),
    (b"x-twice", b"2"),
]
BODY = b"\x00\xff\xfe binary \x80 body \xc3"


def at(s: float) -> str:
    return iso(T0 + s)


def put(
    session: Session,
    id: str,
    *,
    now: float = 0,
    max_age_s: float = 3600,
    max_attempts: int = 3,
    proxy_id: str = "crm",
    headers: async_queue.Fields = HEADERS,
    body: bytes = BODY,
) -> None:
    async_queue.enqueue(
        session,
        id=id,
        proxy_id=proxy_id,
        now=at(now),
        deadline_at=at(now + max_age_s),
        max_attempts=max_attempts,
        idempotency_key=f"idem-{id}",
        accepted_request_id=f"req-{id}",
        method="POST",
        path=f"/api/{proxy_id}/v1/{id}",
        headers=headers,
        body=body,
    )


def live(session: Session, owner: str, seen: float = 0) -> None:
    """A registry row for the gateway `owner`, last seen at `seen`."""
    row = {
        "id": owner,
        "node": owner.split(":")[0],
        "pid": 100,
        "listen": json.dumps([{"mode": "reverse", "address": "127.0.0.1:8080"}]),
        "config": "/etc/keyswap/keyswap.yaml",
        "config_digest": "digest",
        "started_at": at(-3600),
        "last_seen": at(seen),
    }
    session.insert("gateways", [row], replace_on="id")


def lease(
    session: Session,
    owner: str,
    now: float = 0,
    lease_s: float = 30,
    limit: int = 10,
    beat: bool = True,
) -> list[Job]:
    """`owner` leases at `now`; with `beat`, it is live then (its heartbeat)."""
    if beat:
        live(session, owner, seen=now)
    async_queue.sweep(session, at(now), at(now - LIVE_S))  # as the gateway, before each lease
    return async_queue.lease(session, owner, at(now), at(now + lease_s), limit=limit)


def row(session: Session, id: str) -> dict[str, Any]:
    found = async_queue.get(session, id)
    assert found is not None
    return found


def given(session: Session, id: str, **columns: Any) -> None:
    """Set columns of a stored request directly (a state the test starts from)."""
    sets = ", ".join(f'"{c}" = ?' for c in columns)
    sql = f"update async_requests set {sets} where id = ?"  # noqa: S608 (the test's columns)
    assert session.execute(sql, [*columns.values(), id])


@pytest.fixture
def session(backend: Backend) -> Any:
    with backend.session() as s:
        live(s, "gw-a:1")
        live(s, "gw-b:2")
        yield s


def test_enqueue_then_lease_round_trips_every_byte(session: Session) -> None:
    put(session, "r1")
    stored = row(session, "r1")
    assert (stored["state"], stored["attempts"], stored["next_attempt_at"]) == ("queued", 0, at(0))
    [job] = lease(session, "gw-a:1")
    ignored = ("token_id", "token_sha256", "client_ip")
    assert {k: v for k, v in job._asdict().items() if k not in ignored} == {
        "id": "r1",
        "proxy_id": "crm",
        "attempt": 1,
        "max_attempts": 3,
        "deadline_at": at(3600),
        "idempotency_key": "idem-r1",
        "method": "POST",
        "path": "/api/crm/v1/r1",
        "headers": HEADERS,
        "body": BODY,
    }
    leased = row(session, "r1")
    assert (leased["state"], leased["attempts"]) == ("delivering", 1)
    assert (leased["lease_owner"], leased["lease_until"], leased["updated_at"]) == (
        "gw-a:1",
        at(30),
        at(0),
    )
    assert bytes(leased["request_body"]) == BODY


def test_an_empty_body_and_no_headers(session: Session) -> None:
    put(session, "r1", headers=[], body=b"")
    [job] = lease(session, "gw-a:1")
    assert (job.headers, job.body) == ([], b"")


def test_a_held_lease_of_a_live_owner_is_not_leased_again(session: Session) -> None:
    put(session, "r1")
    assert [j.id for j in lease(session, "gw-a:1")] == ["r1"]
    live(session, "gw-a:1", seen=29)
    assert lease(session, "gw-b:2", now=29) == []
    assert lease(session, "gw-a:1", now=29) == []  # nor by its own holder
    assert row(session, "r1")["lease_owner"] == "gw-a:1"


def test_a_lease_that_ran_out_is_leased_again(session: Session) -> None:
    put(session, "r1")
    [first] = lease(session, "gw-a:1")
    live(session, "gw-a:1", seen=30)  # its holder is still live, but took too long
    [second] = lease(session, "gw-b:2", now=30)
    assert (second.id, second.attempt, second.body) == ("r1", 2, BODY)
    taken = row(session, "r1")
    assert (taken["lease_owner"], taken["attempts"], taken["lease_until"]) == ("gw-b:2", 2, at(60))
    # the first holder comes back: its outcome is not written
    done = Outcome("succeeded", status=200, headers=[], body=b"late", body_bytes=4)
    assert not async_queue.finish(session, first, "gw-a:1", at(31), "req-late", done)
    assert row(session, "r1") == taken


@pytest.mark.parametrize("seen", [None, -LIVE_S - 1], ids=["unregistered", "silent"])
def test_the_lease_of_an_owner_that_is_not_live_is_taken_over(
    session: Session, seen: float | None
) -> None:
    put(session, "r1")
    if seen is not None:
        live(session, "gw-gone:3", seen=seen)
    assert [j.attempt for j in lease(session, "gw-gone:3", beat=False)] == [1]
    # the lease runs for 30 s more, but its holder is gone
    [job] = lease(session, "gw-b:2", now=1)
    assert (job.attempt, row(session, "r1")["lease_owner"]) == (2, "gw-b:2")


def test_finish_writes_the_outcome_only_for_the_holder_and_its_attempt(session: Session) -> None:
    put(session, "r1")
    [job] = lease(session, "gw-a:1")
    before = row(session, "r1")
    out = Outcome(
        "succeeded", status=201, headers=[(b"x-a", b"\xff")], body=b"\xffok", body_bytes=3
    )
    assert not async_queue.finish(session, job, "gw-b:2", at(1), "req-2", out)  # not the holder
    stale = job._replace(attempt=2)
    assert not async_queue.finish(session, stale, "gw-a:1", at(1), "req-2", out)
    assert row(session, "r1") == before
    assert async_queue.finish(session, job, "gw-a:1", at(2), "req-2", out)
    done = row(session, "r1")
    assert (done["state"], done["lease_owner"], done["lease_until"]) == ("succeeded", None, None)
    assert (done["last_request_id"], done["updated_at"], done["last_error"]) == (
        "req-2",
        at(2),
        None,
    )
    assert (done["response_status"], bytes(done["response_body"]), done["response_bytes"]) == (
        201,
        b"\xffok",
        3,
    )
    assert async_queue.fields_of(done["response_headers"]) == [(b"x-a", b"\xff")]
    # written once: the same attempt cannot be finished twice
    assert not async_queue.finish(session, job, "gw-a:1", at(3), "req-3", out)


def test_a_retry_later_is_not_due_before_its_time(session: Session) -> None:
    put(session, "r1")
    [job] = lease(session, "gw-a:1")
    later = Outcome("queued", next_attempt_at=at(60), error="503 from the target", status=503)
    assert async_queue.finish(session, job, "gw-a:1", at(1), "req-1", later)
    queued = row(session, "r1")
    assert (queued["state"], queued["next_attempt_at"], queued["last_error"]) == (
        "queued",
        at(60),
        "503 from the target",
    )
    assert lease(session, "gw-a:1", now=59) == []
    [again] = lease(session, "gw-b:2", now=60)
    assert (again.id, again.attempt) == ("r1", 2)


def test_due_requests_are_leased_oldest_due_first_up_to_the_limit(session: Session) -> None:
    for i, due in enumerate([5, 1, 3, 2, 4]):
        put(session, f"r{i}", now=due)
    # RETURNING's order is the database's: which ones were taken is what counts
    assert sorted(j.id for j in lease(session, "gw-a:1", now=10, limit=3)) == ["r1", "r2", "r3"]
    assert sorted(j.id for j in lease(session, "gw-b:2", now=10)) == ["r0", "r4"]


def test_no_attempt_beyond_max_attempts(session: Session) -> None:
    put(session, "r1", max_attempts=2)
    for attempt in (1, 2):
        [job] = lease(session, "gw-a:1", now=attempt)
        assert job.attempt == attempt
        again = Outcome("queued", next_attempt_at=at(attempt), error="timeout")
        assert async_queue.finish(session, job, "gw-a:1", at(attempt), "req", again)
    assert lease(session, "gw-a:1", now=100) == []
    assert row(session, "r1")["attempts"] == 2
    # nor the last attempt again once its holder is gone: the sweep fails it instead
    put(session, "r2", max_attempts=1)
    assert len(lease(session, "gw-gone:3", now=100, beat=False)) == 1
    assert lease(session, "gw-b:2", now=200) == []


def test_sweep_expires_and_fails_what_can_no_longer_be_delivered(session: Session) -> None:
    put(session, "queued-late", max_age_s=60)
    put(session, "queued-in-time", max_age_s=600)
    put(session, "leased-late-gone", max_age_s=60)
    put(session, "leased-late-live", max_age_s=60)
    put(session, "last-gone", max_attempts=1)
    put(session, "last-live", max_attempts=1)
    put(session, "not-last-gone", max_attempts=2)
    put(session, "done-late", max_age_s=60)
    for id, owner in [
        ("leased-late-gone", "gw-gone:3"),
        ("leased-late-live", "gw-a:1"),
        ("last-gone", "gw-gone:3"),
        ("last-live", "gw-a:1"),
        ("not-last-gone", "gw-gone:3"),
    ]:
        given(session, id, state="delivering", attempts=1, lease_owner=owner, lease_until=at(300))
    given(session, "done-late", state="succeeded", updated_at=at(5))
    given(session, "leased-late-live", last_error="502 from the target")
    live(session, "gw-a:1", seen=100)

    assert async_queue.sweep(session, at(100), at(100 - LIVE_S)) == 4
    states = {r["id"]: r for r in async_queue.listing(session)}
    assert {id: r["state"] for id, r in states.items()} == {
        "queued-late": "expired",
        "queued-in-time": "queued",
        "leased-late-gone": "expired",
        "leased-late-live": "delivering",  # its holder may still finish it
        "last-gone": "failed",
        "last-live": "delivering",
        "not-last-gone": "queued",  # due again at once, for another lease
        "done-late": "succeeded",
    }
    assert states["queued-late"]["last_error"] == "no attempt was made in time"
    assert states["last-gone"]["last_error"] == (
        "the gateway making the last attempt stopped during it"
    )
    requeued = states["not-last-gone"]
    assert (requeued["next_attempt_at"], requeued["attempts"]) == (at(100), 1)
    for id in ("queued-late", "leased-late-gone", "last-gone"):
        ended = row(session, id)
        assert (ended["updated_at"], ended["lease_owner"], ended["lease_until"]) == (
            at(100),
            None,
            None,
        )
    # the time a lease ran out counts as abandoned too
    assert async_queue.sweep(session, at(300), at(300 - LIVE_S)) == 2
    assert row(session, "leased-late-live")["state"] == "expired"
    assert row(session, "leased-late-live")["last_error"] == "502 from the target"  # kept
    assert row(session, "last-live")["state"] == "failed"
    assert async_queue.sweep(session, at(300), at(300 - LIVE_S)) == 0


def test_retry_queues_a_failed_or_expired_request_again(session: Session) -> None:
    for id, state in [("f", "failed"), ("e", "expired")]:
        put(session, id)
        given(session, id, state=state, attempts=3, last_error="gave up", updated_at=at(50))
        assert async_queue.retry(session, id, at(100), at(200)) == state
        again = row(session, id)
        assert (again["state"], again["attempts"], again["next_attempt_at"]) == (
            "queued",
            0,
            at(100),
        )
        assert (again["deadline_at"], again["updated_at"]) == (at(200), at(100))
        assert [j.id for j in lease(session, "gw-a:1", now=100)] == [id]


@pytest.mark.parametrize("state", ["queued", "delivering", "succeeded", "cancelled"])
def test_retry_refuses_any_other_state(session: Session, state: str) -> None:
    put(session, "r1")
    given(session, "r1", state=state)
    before = row(session, "r1")
    assert async_queue.retry(session, "r1", at(100), at(200)) is None
    assert row(session, "r1") == before
    assert async_queue.retry(session, "unknown", at(100), at(200)) is None


def test_cancel_only_a_queued_request(session: Session) -> None:
    put(session, "r1")
    assert async_queue.cancel(session, "r1", at(5))
    cancelled = row(session, "r1")
    assert (cancelled["state"], cancelled["updated_at"]) == ("cancelled", at(5))
    assert cancelled["last_error"] == "cancelled from the command line"
    assert lease(session, "gw-a:1", now=10) == []
    assert not async_queue.cancel(session, "r1", at(6))  # once
    assert not async_queue.cancel(session, "unknown", at(6))
    for state in ("delivering", "succeeded", "failed", "expired"):
        put(session, state)
        given(session, state, state=state)
        before = row(session, state)
        assert not async_queue.cancel(session, state, at(7))
        assert row(session, state) == before


def test_prune_deletes_only_finished_requests_older_than_the_cutoff(session: Session) -> None:
    for state in async_queue.STATES:
        for age in ("old", "new"):
            put(session, f"{state}-{age}")
            given(session, f"{state}-{age}", state=state, updated_at=at(0 if age == "old" else 100))
    assert async_queue.prune(session, at(100)) == 4
    left = sorted(r["id"] for r in async_queue.listing(session))
    assert left == sorted(
        [f"{s}-new" for s in async_queue.STATES] + ["queued-old", "delivering-old"]
    )


def test_figures(session: Session) -> None:
    assert async_queue.figures(session, at(0), at(-3600)) == {
        "queued": 0,
        "oldest_queued_at": None,
        "delivering": 0,
        "failed_last_hour": 0,
    }
    put(session, "q1", now=10)
    put(session, "q2", now=5)
    put(session, "d1")
    given(session, "d1", state="delivering")
    for id, state, updated in [
        ("f-recent", "failed", 3000),
        ("e-recent", "expired", 3500),
        ("f-old", "failed", -1),
        ("ok", "succeeded", 3500),
        ("x", "cancelled", 3500),
    ]:
        put(session, id)
        given(session, id, state=state, updated_at=at(updated))
    assert async_queue.figures(session, at(3600), at(0)) == {
        "queued": 2,
        "oldest_queued_at": at(5),
        "delivering": 1,
        "failed_last_hour": 2,
    }


def test_get_and_listing(session: Session) -> None:
    put(session, "a1", now=1)
    put(session, "b1", now=2, proxy_id="billing")
    put(session, "a2", now=3)
    given(session, "a2", state="failed")
    assert async_queue.get(session, "b1", proxy_id="crm") is None  # another proxy's
    assert row(session, "b1")["proxy_id"] == "billing"
    assert async_queue.get(session, "nope") is None
    assert [r["id"] for r in async_queue.listing(session)] == ["a2", "b1", "a1"]
    assert [r["id"] for r in async_queue.listing(session, proxy_id="crm")] == ["a2", "a1"]
    assert [r["id"] for r in async_queue.listing(session, state="queued")] == ["b1", "a1"]
    assert [r["id"] for r in async_queue.listing(session, "crm", "queued", limit=5)] == ["a1"]
    assert [r["id"] for r in async_queue.listing(session, limit=1)] == ["a2"]
    [summary] = async_queue.listing(session, limit=1)
    assert "request_body" not in summary and "response_body" not in summary
    assert (summary["method"], summary["path"], summary["attempts"]) == (
        "POST",
        "/api/crm/v1/a2",
        0,
    )


def finished(session: Session, id: str, body: bytes, body_bytes: int | None = None) -> None:
    put(session, id)
    [job] = [j for j in lease(session, "gw-a:1") if j.id == id]
    headers = [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2")]
    cut = body_bytes is not None and body_bytes > len(body)
    out = Outcome(
        "succeeded", status=200, headers=headers, body=body, body_bytes=body_bytes, truncated=cut
    )
    assert async_queue.finish(session, job, "gw-a:1", at(1), f"req-{id}-1", out)


def test_public_utf8_body_and_joined_headers(session: Session) -> None:
    finished(session, "r1", "héllo".encode(), len("héllo".encode()))
    shown = async_queue.public(row(session, "r1"))
    assert list(shown)[:6] == [
        "id",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "response",
    ]
    assert shown["response"] == {
        "status": 200,
        "headers": {"content-type": "text/plain", "set-cookie": "a=1, b=2"},
        "body": "héllo",
        "body_encoding": "utf-8",
        "body_bytes": 6,
        "truncated": False,
    }
    assert (shown["state"], shown["attempts"], shown["next_attempt_at"]) == ("succeeded", 1, None)
    assert (shown["accepted_request_id"], shown["last_request_id"]) == ("req-r1", "req-r1-1")
    json.dumps(shown)  # a document as it is: no bytes in it


def test_public_base64_body_and_truncated(session: Session) -> None:
    finished(session, "r1", b"\xff\x00\xfe", 1000)
    response = async_queue.public(row(session, "r1"))["response"]
    assert (response["body_encoding"], response["truncated"], response["body_bytes"]) == (
        "base64",
        True,
        1000,
    )
    assert base64.b64decode(response["body"]) == b"\xff\x00\xfe"


def test_public_of_a_queued_request(session: Session) -> None:
    put(session, "r1")
    [job] = lease(session, "gw-a:1")
    shown = async_queue.public(row(session, "r1"))
    assert (shown["state"], shown["next_attempt_at"], shown["response"]) == (
        "delivering",
        None,
        None,
    )
    later = Outcome("queued", next_attempt_at=at(60), error="503", status=503, body=b"busy")
    assert async_queue.finish(session, job, "gw-a:1", at(1), "req-1", later)
    shown = async_queue.public(row(session, "r1"))
    # a response that will be tried again is no result yet
    assert (shown["state"], shown["next_attempt_at"], shown["response"]) == (
        "queued",
        at(60),
        None,
    )
    assert (shown["attempts"], shown["last_error"]) == (1, "503")


def test_concurrent_sessions_lease_each_request_once(backend: Backend) -> None:
    owners = [f"gw-{i}:{i}" for i in range(4)]
    with backend.session() as session:
        for owner in owners:
            live(session, owner)
        for i in range(200):
            put(session, f"r{i:03d}", now=i / 1000)
    leased: dict[str, list[str]] = {owner: [] for owner in owners}
    start = threading.Barrier(len(owners))
    failures: list[BaseException] = []

    def run(owner: str) -> None:
        try:
            start.wait()
            with backend.session() as session:
                while jobs := lease(session, owner, now=1, lease_s=3600, limit=5, beat=False):
                    assert all(j.attempt == 1 for j in jobs)
                    leased[owner] += [j.id for j in jobs]
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=run, args=(owner,)) for owner in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    every = [id for ids in leased.values() for id in ids]
    assert len(every) == len(set(every)) == 200
    with backend.session() as session:
        rows = session.query("select id, state, attempts, lease_owner from async_requests")
    holder = {id: owner for owner, ids in leased.items() for id in ids}
    assert {(r["state"], r["attempts"]) for r in rows} == {("delivering", 1)}
    assert all(holder[r["id"]] == r["lease_owner"] for r in rows)


def test_two_retries_at_once_queue_the_request_once(backend: Backend) -> None:
    """The second retry waits for the first one's transaction, then finds the request
    queued (and perhaps already leased): it changes nothing and says so."""
    with backend.session() as first:
        put(first, "r1")
        given(first, "r1", state="failed", attempts=3)
        second_saw: list[str | None] = []
        with first.transaction():
            assert async_queue.retry(first, "r1", at(100), at(200)) == "failed"

            def second() -> None:
                with backend.session() as session:
                    second_saw.append(async_queue.retry(session, "r1", at(101), at(201)))

            other = threading.Thread(target=second)
            other.start()
            other.join(0.5)  # it reads, then waits for the first one's lock
            assert other.is_alive()
        other.join()
        assert second_saw == [None]
        again = row(first, "r1")
        assert (again["state"], again["deadline_at"]) == ("queued", at(200))


def test_a_lease_takes_only_the_proxies_named(session: Session) -> None:
    put(session, "crm-1", proxy_id="crm")
    put(session, "billing-1", proxy_id="billing")
    assert async_queue.lease(session, "gw-a:1", at(0), at(30), 10, []) == []
    [job] = async_queue.lease(session, "gw-a:1", at(0), at(30), 10, ["billing", "x"])
    assert job.id == "billing-1" and row(session, "crm-1")["state"] == "queued"
