"""`keyswap async list|show|retry|cancel`: the requests accepted with `Prefer:
respond-async`, from the queue in the state database (a thin layer over
`keyswap.state.async_queue`). Retry and cancel change a request's state and write an
audit row in the same transaction."""

from __future__ import annotations

import base64
import time
from typing import Any, NoReturn

import click

from keyswap.cli.options import (
    config_option,
    connected,
    db_option,
    json_option,
    print_json,
    reading,
    table,
)
from keyswap.config.loader import ConfigError, load_config
from keyswap.config.model import AsyncPolicy
from keyswap.state import async_queue, migrations
from keyswap.state.backends import Session
from keyswap.state.store import audit, iso

# The schema version that made the `async_requests` table: an older database (its
# gateways not yet upgraded) holds no async request.
QUEUE_SINCE = 4
RETRYABLE = ("failed", "expired")
DEFAULT_MAX_AGE_S = AsyncPolicy().max_age_s
LIST_COLUMNS = [
    "created_at",
    "id",
    "proxy_id",
    "state",
    "attempts",
    "next_attempt_at",
    "method",
    "path",
    "status",
    "last_error",
]

id_argument = click.argument("async_id", metavar="ID")
actor_option = click.option("--actor", help="Who makes the change [default: the OS user].")


@click.group("async")
def async_requests() -> None:
    """Requests accepted with `Prefer: respond-async`: list them, show one with its
    response, retry a failed or expired one, cancel a queued one.

    \b
    Example:
      keyswap async list --state failed
    """


def _has_queue(session: Session) -> bool:
    return migrations.version(session) >= QUEUE_SINCE


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    # As async_queue.public says it: the next attempt's time only while one is planned.
    return {**row, "next_attempt_at": row["next_attempt_at"] if row["state"] == "queued" else None}


@async_requests.command("list")
@config_option
@db_option
@click.option("--proxy", help="Only this proxy id.")
@click.option("--state", type=click.Choice(async_queue.STATES), help="Only requests in this state.")
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(min=1), help="At most this many."
)
@json_option
def list_async(
    config_path: str,
    db_path: str | None,
    proxy: str | None,
    state: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List stored async requests, newest first, without their bodies.

    \b
    Example:
      keyswap async list --proxy crm-prod --state failed --limit 20
    """
    with reading(config_path, db_path) as backend, backend.session() as session:
        found = async_queue.listing(session, proxy, state, limit) if _has_queue(session) else []
    rows = [_summary(row) for row in found]
    if as_json:
        print_json(rows)
        return
    shown = [
        {
            **row,
            "attempts": f"{row['attempts']}/{row['max_attempts']}",
            "status": row["response_status"],
        }
        for row in rows
    ]
    click.echo(table(shown, LIST_COLUMNS))


@async_requests.command("show")
@config_option
@db_option
@id_argument
@json_option
def show(config_path: str, db_path: str | None, async_id: str, as_json: bool) -> None:
    """Show one async request: its state, attempts, deadline, last error and, once it is
    done, the target's response (a body that is not UTF-8 is base64 in --json).

    \b
    Example:
      keyswap async show 01a1fdd8e203642913c39c7a4f --json
    """
    with reading(config_path, db_path) as backend, backend.session() as session:
        row = async_queue.get(session, async_id) if _has_queue(session) else None
    if row is None:
        _unknown(async_id)
    shown = async_queue.public(row)
    if as_json:
        print_json(shown)
    else:
        click.echo("\n".join(_lines(shown)))


def _lines(shown: dict[str, Any]) -> list[str]:
    lines = [
        f"{shown['id']}: {shown['state']}, {shown['attempts']} of {shown['max_attempts']} attempts",
        f"  proxy:        {shown['proxy_id']}",
        f"  request:      {shown['method']} {shown['path']}",
        f"  idempotency:  {shown['idempotency_key']}",
        f"  created:      {shown['created_at']}",
        f"  updated:      {shown['updated_at']}",
        f"  deadline:     {shown['deadline_at']}",
    ]
    if shown["next_attempt_at"]:
        lines.append(f"  next attempt: {shown['next_attempt_at']}")
    if shown["last_error"]:
        lines.append(f"  last error:   {shown['last_error']}")
    logged = f"accepted {shown['accepted_request_id']}"
    if shown["last_request_id"]:
        logged += f", last attempt {shown['last_request_id']}"
    lines.append(f"  log rows:     {logged}")
    response = shown["response"]
    if response is None:
        return lines
    size = f"{response['body_bytes']} bytes" if response["body_bytes"] is not None else "body"
    if response["truncated"]:
        size += f", truncated to {len(_body(response))}"
    lines.append(f"  response:     {response['status']} ({size})")
    lines += [f"    {name}: {value}" for name, value in response["headers"].items()]
    if response["body_encoding"] == "utf-8":
        if response["body"]:
            lines += ["", response["body"]]
    else:
        lines.append("  (the body is not UTF-8: --json shows it in base64)")
    return lines


def _body(response: dict[str, Any]) -> bytes:
    if response["body_encoding"] == "utf-8":
        return str(response["body"]).encode()
    return base64.b64decode(response["body"])


@async_requests.command("retry")
@config_option
@db_option
@actor_option
@id_argument
def retry(config_path: str, db_path: str | None, actor: str | None, async_id: str) -> None:
    """Queue a failed or expired async request again: its attempts count from zero, and
    its new deadline is now plus its proxy's `async.max_age_s` (the default, one day, when
    the proxy is no longer in the config). Writes an audit row.

    \b
    Example:
      keyswap async retry 01a1fdd8e203642913c39c7a4f
    """
    with connected(config_path, db_path, create=False) as backend:
        queue = migrations.writable(backend) >= QUEUE_SINCE
        with backend.session() as session:
            row = async_queue.get(session, async_id) if queue else None
            if row is None:
                _unknown(async_id)
            if row["state"] not in RETRYABLE:
                _refuse(row, "retried")
            proxy_id = row["proxy_id"]
            now = time.time()
            deadline = iso(now + _max_age_s(config_path, proxy_id))
            with session.transaction():
                previous = async_queue.retry(session, async_id, iso(now), deadline)
                if previous is None:  # another command changed it since it was read
                    _refuse(async_queue.get(session, async_id) or row, "retried")
                detail = {"proxy_id": proxy_id, "previous_state": previous, "deadline_at": deadline}
                audit(session, "async-retry", async_id, detail, actor)
    click.echo(
        f"async request {async_id} ({proxy_id}): {previous} -> queued,"
        f" up to {row['max_attempts']} attempts until {deadline}"
    )


def _max_age_s(config_path: str, proxy_id: str) -> float:
    """The proxy's `async.max_age_s`, or the default (with a warning) when the config
    cannot tell."""
    try:
        proxy = load_config(config_path).config.proxies.get(proxy_id)
    except ConfigError:
        why = f"{config_path} cannot be loaded (`keyswap check` says why)"
    else:
        if proxy is not None:
            return proxy.async_.max_age_s
        why = f"proxy '{proxy_id}' is not in {config_path}"
    click.echo(
        f"warning: {why}: the new deadline uses the default max_age_s ({DEFAULT_MAX_AGE_S:g} s)",
        err=True,
    )
    return DEFAULT_MAX_AGE_S


@async_requests.command("cancel")
@config_option
@db_option
@actor_option
@id_argument
def cancel(config_path: str, db_path: str | None, actor: str | None, async_id: str) -> None:
    """Cancel a queued async request: no further attempt is made. One being delivered
    cannot be cancelled. Writes an audit row.

    \b
    Example:
      keyswap async cancel 01a1fdd8e203642913c39c7a4f
    """
    with connected(config_path, db_path, create=False) as backend:
        queue = migrations.writable(backend) >= QUEUE_SINCE
        with backend.session() as session, session.transaction():
            row = async_queue.get(session, async_id) if queue else None
            if row is None:
                _unknown(async_id)
            if row["state"] != "queued":
                _refuse(row, "cancelled")
            if not async_queue.cancel(session, async_id, iso(time.time())):
                # a gateway leased it since it was read (PostgreSQL: another transaction)
                _refuse(async_queue.get(session, async_id) or row, "cancelled")
            detail = {"proxy_id": row["proxy_id"], "previous_state": "queued"}
            audit(session, "async-cancel", async_id, detail, actor)
    click.echo(f"async request {async_id} ({row['proxy_id']}): queued -> cancelled")


def _unknown(async_id: str) -> NoReturn:
    raise click.ClickException(
        f"no async request {async_id}; `keyswap async list` shows the stored ones"
    )


def _refuse(row: dict[str, Any], change: str) -> NoReturn:
    """Why a request in this state cannot be `change`d (retried, cancelled)."""
    async_id, state = row["id"], row["state"]
    if state == "delivering":
        reason = (
            f"async request {async_id} is being delivered now (attempt {row['attempts']} of"
            f" {row['max_attempts']}) and cannot be {change}"
        )
    else:
        allowed = "a failed or expired one" if change == "retried" else "a queued one"
        reason = f"async request {async_id} is {state}: only {allowed} can be {change}"
    raise click.ClickException(f"{reason}; `keyswap async show {async_id}` shows it")
