"""The async queue: requests accepted with `Prefer: respond-async`, stored before their
202 is sent, leased to one gateway at a time for each delivery attempt, and kept with
their result until pruned. Every function takes a session; every time is ISO 8601 UTC
text (`store.iso`), which both databases compare as text.

A lease is exclusive: PostgreSQL picks due rows with `FOR UPDATE SKIP LOCKED`, SQLite
inside `BEGIN IMMEDIATE` (one writer at a time). A lease ends when its holder writes the
attempt's outcome, when it runs out, or when its holder is no longer a live gateway in
the registry (killed): then another gateway takes the request again. The outcome is
written only while the lease is still the writer's (compare and swap on the owner and
the attempt number), so a gateway that was paused past its lease cannot overwrite the
work of the one that took over."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from keyswap.state.backends import Session

State = Literal["queued", "delivering", "succeeded", "failed", "expired", "cancelled"]
STATES: tuple[State, ...] = ("queued", "delivering", "succeeded", "failed", "expired", "cancelled")
DONE: tuple[State, ...] = ("succeeded", "failed", "expired", "cancelled")

Fields = Sequence[tuple[bytes, bytes]]


def fields_json(fields: Fields) -> str:
    """Header fields as JSON text, every byte kept (each byte one code point)."""
    return json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in fields])


def fields_of(text: str | None) -> list[tuple[bytes, bytes]]:
    """Header fields back from `fields_json`'s text (none for NULL)."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(text or "[]")]


class Job(NamedTuple):
    """One leased delivery attempt of a stored request."""

    id: str
    proxy_id: str
    token_id: str | None
    token_sha256: str | None
    client_ip: str | None
    attempt: int  # this attempt's number, from 1
    max_attempts: int
    deadline_at: str
    idempotency_key: str
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


def enqueue(
    session: Session,
    *,
    id: str,
    proxy_id: str,
    now: str,
    deadline_at: str,
    max_attempts: int,
    idempotency_key: str,
    accepted_request_id: str,
    method: str,
    path: str,
    headers: Fields,
    body: bytes,
    token_id: str | None = None,
    token_sha256: str | None = None,
    client_ip: str | None = None,
) -> None:
    """Store an accepted request, due at once. Committed when this returns."""
    row = {
        "id": id,
        "proxy_id": proxy_id,
        "token_id": token_id,
        "token_sha256": token_sha256,
        "client_ip": client_ip,
        "state": "queued",
        "created_at": now,
        "updated_at": now,
        "deadline_at": deadline_at,
        "next_attempt_at": now,
        "attempts": 0,
        "max_attempts": max_attempts,
        "idempotency_key": idempotency_key,
        "accepted_request_id": accepted_request_id,
        "method": method,
        "path": path,
        "request_headers": fields_json(headers),
        "request_body": body,
    }
    with session.transaction():
        session.insert("async_requests", [row])


# A delivering row whose holder is gone: its lease ran out, or its holder is not a live
# gateway (no heartbeat since `live_since`). Parameters: now, live_since.
_ABANDONED = (
    "(state = 'delivering' and (lease_until <= ? or lease_owner is null"
    " or lease_owner not in (select id from gateways where last_seen >= ?)))"
)


def sweep(session: Session, now: str, live_since: str) -> int:
    """End what can no longer be delivered: requests past their deadline (`expired`),
    and abandoned attempts that were the last allowed (`failed`); queue the other
    abandoned ones again, due at once. How many it changed."""
    with session.transaction():  # all or nothing: a gateway may leave the registry meanwhile
        return _sweep(session, now, live_since)


def _sweep(session: Session, now: str, live_since: str) -> int:
    changed = session.execute(
        "update async_requests set state = 'expired', updated_at = ?, lease_owner = null,"  # noqa: S608 (fragments of this module; values bound)
        " lease_until = null, last_error = coalesce(last_error, 'no attempt was made in time')"
        " where state in ('queued', 'delivering') and deadline_at <= ?"
        f" and (state = 'queued' or {_ABANDONED})",
        [now, now, now, live_since],
    )
    changed += session.execute(
        "update async_requests set state = 'failed', updated_at = ?, lease_owner = null,"  # noqa: S608 (fragments of this module; values bound)
        " lease_until = null,"
        " last_error = 'the gateway making the last attempt stopped during it'"
        f" where attempts >= max_attempts and {_ABANDONED}",
        [now, now, live_since],
    )
    changed += session.execute(
        "update async_requests set state = 'queued', updated_at = ?, next_attempt_at = ?,"  # noqa: S608 (fragments of this module; values bound)
        " lease_owner = null, lease_until = null,"
        " last_error = 'the gateway making an attempt stopped during it'"
        f" where attempts < max_attempts and {_ABANDONED}",
        [now, now, now, live_since],
    )
    return changed


def lease(
    session: Session,
    owner: str,
    now: str,
    until: str,
    limit: int,
    proxy_ids: Sequence[str] | None = None,
) -> list[Job]:
    """Lease up to `limit` due requests to `owner` until `until`, oldest due first: each
    becomes `delivering`, its attempt count one higher. With `proxy_ids`, only requests
    of those proxies (the ones the owner serves). (An abandoned attempt is queued again
    by `sweep`: this reads the queued ones only, from an index.)"""
    skip = " for update skip locked" if session.dialect == "postgresql" else ""
    only = ""
    if proxy_ids is not None:
        if not proxy_ids:
            return []
        only = f" and proxy_id in ({', '.join('?' * len(proxy_ids))})"
    with session.transaction():
        rows = session.query(
            "update async_requests set state = 'delivering', attempts = attempts + 1,"  # noqa: S608 (fragments of this module; values bound)
            " lease_owner = ?, lease_until = ?, updated_at = ?"
            " where id in (select id from async_requests"
            " where state = 'queued' and next_attempt_at <= ? and deadline_at > ?"
            f" and attempts < max_attempts{only} order by next_attempt_at limit ?{skip})"
            " returning id, proxy_id, token_id, token_sha256, client_ip, attempts, max_attempts,"
            " deadline_at, idempotency_key, method, path, request_headers, request_body",
            [owner, until, now, now, now, *(proxy_ids or ()), limit],
        )
    return [
        Job(
            id=r["id"],
            proxy_id=r["proxy_id"],
            token_id=r["token_id"],
            token_sha256=r["token_sha256"],
            client_ip=r["client_ip"],
            attempt=int(r["attempts"]),
            max_attempts=int(r["max_attempts"]),
            deadline_at=r["deadline_at"],
            idempotency_key=r["idempotency_key"],
            method=r["method"],
            path=r["path"],
            headers=fields_of(r["request_headers"]),
            body=bytes(r["request_body"] or b""),
        )
        for r in rows
    ]


class Outcome(NamedTuple):
    """What an attempt ended in: the request's next state and what to keep of it."""

    state: State  # queued (to be retried), succeeded, failed or expired
    next_attempt_at: str | None = None
    error: str | None = None
    status: int | None = None
    headers: Fields | None = None
    body: bytes | None = None
    body_bytes: int | None = None  # the whole body's size
    truncated: bool = False  # the body was cut at the bound (before masking)


def finish(session: Session, job: Job, owner: str, now: str, request_id: str, out: Outcome) -> bool:
    """Write an attempt's outcome, if the lease is still `owner`'s for this attempt:
    False when another gateway has taken the request over meanwhile (nothing written)."""
    changes: dict[str, Any] = {
        "state": out.state,
        "updated_at": now,
        "lease_owner": None,
        "lease_until": None,
        "last_request_id": request_id,
        "last_error": out.error,
        "next_attempt_at": out.next_attempt_at or now,
    }
    if out.state == "succeeded":
        changes["request_body"] = None  # delivered: only a failed or expired one is retried
    if out.status is not None:
        changes |= {
            "response_status": out.status,
            "response_headers": fields_json(out.headers or ()),
            "response_body": out.body or b"",
            "response_bytes": out.body_bytes,
            "response_truncated": int(out.truncated),
        }
    sets = ", ".join(f'"{column}" = ?' for column in changes)
    with session.transaction():
        changed = session.execute(
            f"update async_requests set {sets}"  # noqa: S608 (the columns are this module's)
            " where id = ? and state = 'delivering' and lease_owner = ? and attempts = ?",
            [*changes.values(), job.id, owner, job.attempt],
        )
    return changed == 1


def get(session: Session, id: str, proxy_id: str | None = None) -> dict[str, Any] | None:
    """One stored request (of `proxy_id`, when given), or None."""
    sql = "select * from async_requests where id = ?"
    params: list[Any] = [id]
    if proxy_id is not None:
        sql += " and proxy_id = ?"
        params.append(proxy_id)
    rows = session.query(sql, params)
    return rows[0] if rows else None


SUMMARY_COLUMNS = (
    "id, proxy_id, state, created_at, updated_at, attempts, max_attempts,"
    " next_attempt_at, last_error, method, path, response_status"
)


def listing(
    session: Session,
    proxy_id: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Stored requests, newest first, without their bodies."""
    where, params = [], []
    if proxy_id is not None:
        where.append("proxy_id = ?")
        params.append(proxy_id)
    if state is not None:
        where.append("state = ?")
        params.append(state)
    clause = f" where {' and '.join(where)}" if where else ""
    return session.query(
        f"select {SUMMARY_COLUMNS} from async_requests{clause}"  # noqa: S608
        " order by created_at desc, id desc limit ?",
        [*params, limit],
    )


def retry(session: Session, id: str, now: str, deadline_at: str) -> str | None:
    """Queue a `failed` or `expired` request again, with its attempts counted from zero
    and a new deadline. Its previous state, or None when it is not in either state."""
    with session.transaction():
        found = session.query("select state from async_requests where id = ?", [id])
        if not found or found[0]["state"] not in ("failed", "expired"):
            return None
        previous = str(found[0]["state"])
        # Only from the state just read: on PostgreSQL a concurrent retry read it too, and
        # may have queued the request (and a gateway leased it) since.
        changed = session.execute(
            "update async_requests set state = 'queued', attempts = 0, next_attempt_at = ?,"
            " deadline_at = ?, updated_at = ? where id = ? and state = ?",
            [now, deadline_at, now, id, previous],
        )
        return previous if changed == 1 else None


def cancel(session: Session, id: str, now: str) -> bool:
    """Cancel a `queued` request; False when it is in another state."""
    with session.transaction():
        changed = session.execute(
            "update async_requests set state = 'cancelled', updated_at = ?,"
            " last_error = 'cancelled from the command line', request_body = null"
            " where id = ? and state = 'queued'",
            [now, id],
        )
    return changed == 1


def prune(session: Session, before: str) -> int:
    """Delete finished requests last changed before `before`; how many."""
    return session.execute(
        "delete from async_requests where updated_at < ?"
        " and state in ('succeeded', 'failed', 'expired', 'cancelled')",
        [before],
    )


def backlog(session: Session) -> dict[str, int]:
    """Requests not yet done (queued or being delivered), by proxy."""
    rows = session.query(
        "select proxy_id, count(*) as n from async_requests"
        " where state in ('queued', 'delivering') group by proxy_id"
    )
    return {r["proxy_id"]: int(r["n"]) for r in rows}


def figures(session: Session, now: str, hour_ago: str) -> dict[str, Any]:
    """The queue at a glance: depth, the oldest queued request's creation time,
    deliveries in progress, failures (failed or expired) in the last hour."""
    [row] = session.query(
        "select"
        " sum(case when state = 'queued' then 1 else 0 end) as queued,"
        " min(case when state = 'queued' then created_at end) as oldest_queued_at,"
        " sum(case when state = 'delivering' then 1 else 0 end) as delivering"
        " from async_requests where state in ('queued', 'delivering')"
    )
    [failed] = session.query(
        "select count(*) as n from async_requests where state in ('failed', 'expired')"
        " and updated_at >= ?",
        [hour_ago],
    )
    return {
        "queued": int(row["queued"] or 0),
        "oldest_queued_at": row["oldest_queued_at"],
        "delivering": int(row["delivering"] or 0),
        "failed_last_hour": int(failed["n"] or 0),
    }


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored request as `GET /_keyswap/requests/<id>` and `keyswap async show` give
    it: DESIGN's members first, then the rest. The body is text when it is UTF-8,
    base64 otherwise; a truncated body says how large the whole was."""
    response = None
    if row.get("response_status") is not None and row["state"] in DONE:
        body = bytes(row.get("response_body") or b"")
        try:
            text, encoding = body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode("ascii"), "base64"
        whole = row.get("response_bytes")
        headers: dict[str, str] = {}
        for name, value in fields_of(row.get("response_headers")):
            key, shown = name.decode("latin-1").lower(), value.decode("utf-8", "replace")
            headers[key] = f"{headers[key]}, {shown}" if key in headers else shown
        response = {
            "status": row["response_status"],
            "headers": headers,
            "body": text,
            "body_encoding": encoding,
            "body_bytes": whole,
            "truncated": bool(row.get("response_truncated")),
        }
    return {
        "id": row["id"],
        "state": row["state"],
        "attempts": row["attempts"],
        "next_attempt_at": row["next_attempt_at"] if row["state"] == "queued" else None,
        "last_error": row["last_error"],
        "response": response,
        "proxy_id": row["proxy_id"],
        "method": row["method"],
        "path": row["path"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "deadline_at": row["deadline_at"],
        "max_attempts": row["max_attempts"],
        "idempotency_key": row["idempotency_key"],
        "accepted_request_id": row["accepted_request_id"],
        "last_request_id": row["last_request_id"],
    }
