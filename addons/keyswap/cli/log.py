"""`keyswap logs`, `stats`, `curl` and `audit`: reading the activity log and the audit
trail (a thin layer over `keyswap.state.queries`)."""

from __future__ import annotations

import time
from typing import Any, NoReturn

import click

from keyswap.cli.options import (
    config_option,
    db_option,
    fail_on_value_error,
    json_option,
    print_json,
    reading,
    since_option,
    table,
)
from keyswap.config.loader import ConfigError, load_config
from keyswap.state import queries
from keyswap.state.backends import Session

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
# The gateway writes rows every quarter second; twice that is soon enough to show them.
POLL_S = 0.5


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
@click.option("--follow", is_flag=True, help="Then print rows as they are written (Ctrl-C stops).")
@json_option
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
    """Show the newest rows of the activity log, oldest first; with --follow, then every
    matching row as it is written (with --json: one JSON object per line).

    \b
    Example:
      keyswap logs --proxy crm-prod --status 5xx --since 2h
    """
    where = fail_on_value_error(lambda: queries.LogFilter.of(proxy, status, code, since))
    with reading(config_path, db_path) as backend, backend.session() as session:
        if follow:
            follow_log(session, where, limit, as_json)
        rows = queries.logs(session, where, limit)
    if as_json:
        print_json(rows)
    else:
        click.echo(table(rows, LOG_COLUMNS))


def follow_log(session: Session, where: queries.LogFilter, limit: int, as_json: bool) -> NoReturn:
    """Print the newest matching rows, then each new one as it is written, until Ctrl-C."""
    follower = queries.Follower(session, where)
    widths: dict[str, int] = {}

    def show(rows: list[dict[str, Any]], header: bool) -> None:
        if as_json:
            for row in rows:
                print_json(row, line=True)
        elif rows or header:
            click.echo(table(rows, LOG_COLUMNS, widths=widths, header=header))

    show(follower.start(limit), header=True)
    while True:
        time.sleep(POLL_S)
        for rows in follower.poll():
            show(rows, header=False)


@click.command()
@config_option
@db_option
@since_option("Only requests since then")
@json_option
def stats(config_path: str, db_path: str | None, since: str | None, as_json: bool) -> None:
    """Per proxy: requests, success and error rates, denied, p50/p95/p99 latency of
    forwarded requests (nearest rank, 3 significant digits), bytes.

    \b
    Example:
      keyswap stats --since 1d
    """
    with reading(config_path, db_path) as backend, backend.session() as session:
        rows = fail_on_value_error(lambda: queries.stats(session, since))
    if as_json:
        print_json(rows)
        return
    columns = ["proxy", "requests", "success_rate", "error_rate", "denied"]
    columns += ["p50_ms", "p95_ms", "p99_ms", "bytes_in", "bytes_out"]
    shown = [{**row, "proxy": row["proxy"] or "(no proxy)"} for row in rows]
    click.echo(table(shown, columns))


@click.command()
@config_option
@db_option
@click.argument("request_id")
@json_option
def curl(config_path: str, db_path: str | None, request_id: str, as_json: bool) -> None:
    """Print a logged request as the equivalent curl command, secrets masked.

    \b
    Example:
      keyswap curl 01a1fdd8e203642913c39c7a4f
    """
    with reading(config_path, db_path) as backend, backend.session() as session:
        row = queries.request(session, request_id)
    if row is None:
        raise click.ClickException(f"no request {request_id} in the activity log")
    try:
        config = load_config(config_path).config
    except ConfigError:
        config = None  # the command still prints, without the proxy's address
    argv = fail_on_value_error(lambda: queries.curl_argv(row, config))
    command = queries.curl_command(row, config)
    if as_json:
        print_json({"id": request_id, "command": command, "argv": argv})
    else:
        click.echo(command)


@click.command()
@config_option
@db_option
@since_option("Only entries since then")
@click.option("--resource", help="Only entries about this resource.")
@json_option
def audit(
    config_path: str, db_path: str | None, since: str | None, resource: str | None, as_json: bool
) -> None:
    """Show the audit trail: config reloads and changes made with keyswap.

    \b
    Example:
      keyswap audit --since 1d
    """
    with reading(config_path, db_path) as backend, backend.session() as session:
        rows = fail_on_value_error(lambda: queries.audit(session, since, resource))
    if as_json:
        print_json(rows)
        return
    click.echo(table(rows, ["at", "actor", "action", "resource", "detail"]))
