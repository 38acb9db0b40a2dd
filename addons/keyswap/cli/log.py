"""`keyswap logs`, `stats`, `curl` and `audit`: reading the activity log and the audit
trail (a thin layer over `keyswap.state.queries`)."""

from __future__ import annotations

import json
import time
from contextlib import closing
from typing import Any

import click
from sqlite_utils import Database

from keyswap.cli.options import (
    config_option,
    db_option,
    fail_on_value_error,
    open_log,
    since_option,
    table,
)
from keyswap.config.loader import ConfigError, load_config
from keyswap.state import queries

LOG_COLUMNS = [
    "started_at",
    "id",
    "proxy_id",
    "method",
    "status",
    "proxy_code",
    "duration_ms",
    "path",
]


@click.command()
@config_option
@db_option
@click.option("--proxy", help="Only this proxy id.")
@click.option("--status", help="2xx, 4xx, 5xx or an exact status.")
@click.option(
    "--code", type=click.Choice(["proxy-access-granted", "proxy-access-denied", "proxy-error"])
)
@since_option("Only rows since then")
@click.option("--limit", default=50, show_default=True, help="At most this many rows.")
@click.option("--follow", is_flag=True, help="Keep printing new rows (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def logs(
    config_path: str,
    db_path: str | None,
    proxy: str | None,
    status: str | None,
    code: str | None,
    since: str | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Show the activity log, newest last.

    \b
    Example:
      keyswap logs --proxy crm-prod --status 5xx --since 2h
    """
    with closing(open_log(config_path, db_path)) as db:
        follow_log(db, filters_for(proxy, status, code), since, limit, follow, as_json)


def filters_for(proxy: str | None, status: str | None, code: str | None) -> dict[str, Any]:
    return {"proxy": proxy, "status": status, "code": code}


def follow_log(
    db: Database,
    filters: dict[str, Any],
    since: str | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Print matching rows; with `follow`, keep printing new ones once a second."""
    rows = fail_on_value_error(lambda: queries.logs(db, **filters, since=since, limit=limit))
    header = True
    while True:
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
        elif rows or header:
            lines = table([{c: r[c] for c in LOG_COLUMNS} for r in rows], LOG_COLUMNS)
            click.echo(lines if header else lines.split("\n", 1)[1])
            header = False
        if not follow:
            return
        time.sleep(1)
        if rows:
            rows = queries.logs(db, **filters, after=rows[-1]["id"], limit=10_000)
        else:
            rows = queries.logs(db, **filters, since=since, limit=limit)


@click.command()
@config_option
@db_option
@since_option("Only requests since then")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def stats(config_path: str, db_path: str | None, since: str | None, as_json: bool) -> None:
    """Per proxy: requests, success and error rates, denied, p50/p95/p99 latency, bytes.

    \b
    Example:
      keyswap stats --since 1d
    """
    with closing(open_log(config_path, db_path)) as db:
        rows = fail_on_value_error(lambda: queries.stats(db, since))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["proxy", "requests", "success_rate", "error_rate", "denied"]
    columns += ["p50_ms", "p95_ms", "p99_ms", "bytes_in", "bytes_out"]
    click.echo(table(rows, columns))


@click.command()
@config_option
@db_option
@click.argument("request_id")
def curl(config_path: str, db_path: str | None, request_id: str) -> None:
    """Print a logged request as the equivalent curl command, secrets masked.

    \b
    Example:
      keyswap curl 01a1fdd8e203642913c39c7a4f
    """
    with closing(open_log(config_path, db_path)) as db:
        found = list(db.query("select * from requests where id = ?", [request_id]))
    if not found:
        raise click.ClickException(f"no request {request_id} in the activity log")
    try:
        config = load_config(config_path).config
    except ConfigError:
        config = None  # the command still prints, without the proxy's address
    click.echo(fail_on_value_error(lambda: queries.curl_command(dict(found[0]), config)))


@click.command()
@config_option
@db_option
@since_option("Only entries since then")
@click.option("--resource", help="Only entries about this resource.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(
    config_path: str, db_path: str | None, since: str | None, resource: str | None, as_json: bool
) -> None:
    """Show the audit trail: config reloads and changes made with keyswap.

    \b
    Example:
      keyswap audit --since 1d
    """
    with closing(open_log(config_path, db_path)) as db:
        rows = fail_on_value_error(lambda: queries.audit(db, since, resource))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(table(rows, ["at", "actor", "action", "resource", "detail"]))
