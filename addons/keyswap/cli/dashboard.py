"""`keyswap dashboard`: the activity log in Datasette, read-only, with keyswap's charts,
canned queries and table defaults (a thin layer over `keyswap.state.dashboard`;
Datasette is the optional extra `keyswap[datasette]`)."""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
import webbrowser
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import closing
from pathlib import Path
from typing import Any

import click

from keyswap.cli.options import config_option, db_option, default_db
from keyswap.net.urls import hostport
from keyswap.state import dashboard as views
from keyswap.state.backends import StateError, is_url, shown

INSTALL = "pip install 'keyswap[datasette]'"
# Datasette's defaults suit ad-hoc SQL. A chart reads every row of its time window, a
# time series of many proxies has more than 1,000 points, and a facet of the requests
# table counts a day of them; a long read never blocks the gateway's writes (WAL), it
# only holds back a checkpoint while it runs. Suggested facets would scan the table.
SETTINGS = {
    "sql_time_limit_ms": 10_000,
    "max_returned_rows": 10_000,
    "facet_time_limit_ms": 1_000,
    "suggest_facets": False,
}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


@click.command()
@config_option
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8001, show_default=True, type=click.IntRange(1, 65535), help="Port."
)
@click.option("--open", "open_browser", is_flag=True, help="Open the dashboard in a browser.")
@click.option(
    "--metadata",
    "print_metadata",
    is_flag=True,
    help="Print the Datasette metadata for this database and exit (`datasette DB -m FILE`).",
)
def dashboard(
    config_path: str,
    db_path: str | None,
    host: str,
    port: int,
    open_browser: bool,
    print_metadata: bool,
) -> None:
    """Serve the activity log in Datasette, read-only: charts, queries and tables.

    Charts of requests per proxy, error rate, latency percentiles, refusals, tokens and
    upstream proxy failures are at /-/dashboards/keyswap. The database is only read,
    so a running gateway keeps writing it. Needs pip install 'keyswap[datasette]'.

    \b
    Example:
      keyswap dashboard --db keyswap.db --port 8001 --open
    """
    db = db_path or default_db(config_path)
    if is_url(db):
        try:
            where = shown(db)
        except StateError as e:
            raise click.ClickException(str(e)) from None
        raise click.ClickException(
            f"keyswap dashboard serves an SQLite activity log with Datasette; {where} is"
            " PostgreSQL: read it with keyswap logs and keyswap stats, or a PostgreSQL client"
        )
    path = Path(db)
    if print_metadata:
        click.echo(views.metadata_yaml(views.datasette_name(path)), nl=False)
        return
    hidden = check_log(path)
    name = views.served_name(path)
    app = with_table_defaults(datasette_for(path, name).app(), name, hidden)
    import uvicorn  # Datasette's own server, installed with it

    url = f"http://{hostport(host, port)}/-/dashboards/{views.DASHBOARD}"
    click.echo(f"keyswap dashboard: {path} (read-only) at {url}")
    if not _is_loopback(host):
        click.echo(
            f"warning: the dashboard has no login; anyone who reaches {host} can read the log",
            err=True,
        )
    if open_browser:  # once the server is likely listening, as Datasette's --open does
        threading.Timer(0.5, webbrowser.open, [url]).start()
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")


def read_only_uri(path: Path) -> str:
    """The SQLite URI that opens `path` read-only. Never `immutable=1`: that would tell
    SQLite the file cannot change, so it would skip the WAL and its locks and read the
    pages of a live gateway's database half-written."""
    return path.resolve().as_uri() + "?mode=ro"


def check_log(path: Path) -> tuple[str, ...]:
    """That `path` is a keyswap activity log, read without writing; the HIDDEN_COLUMNS
    it has."""
    if not path.is_file():
        raise click.ClickException(
            f"no activity log at {path}; pass --db (or set KEYSWAP_DB) to the gateway's database"
        )
    try:
        with closing(sqlite3.connect(read_only_uri(path), uri=True)) as conn:
            columns = {row[1] for row in conn.execute("pragma table_info(requests)")}
    except sqlite3.Error as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None
    if not columns:
        raise click.ClickException(f"{path} is not a keyswap activity log (no requests table)")
    return tuple(c for c in views.HIDDEN_COLUMNS if c in columns)


def datasette_for(path: Path, name: str) -> Any:
    """Datasette serving `path` as `name` with keyswap's metadata, never writing to it."""
    try:
        import datasette_dashboards  # noqa: F401  (the charts: found by Datasette as a plugin)
        from datasette.app import Datasette  # type: ignore[import-untyped]
        from datasette.database import Database  # type: ignore[import-untyped]
        from datasette.utils import sqlite3 as datasette_sqlite3  # type: ignore[import-untyped]
    except ImportError as e:
        raise click.ClickException(
            f"keyswap dashboard needs Datasette and datasette-dashboards ({e.name} is "
            f"missing): {INSTALL}"
        ) from None

    class ReadOnlyLog(Database):  # type: ignore[misc]
        """The activity log, opened read-only on every connection; no write connection."""

        def connect(self, write: bool = False) -> Any:
            if write:
                raise PermissionError("keyswap dashboard never writes to the activity log")
            conn = datasette_sqlite3.connect(read_only_uri(path), uri=True, check_same_thread=False)
            self._all_file_connections.append(conn)  # what Database.close() closes
            return conn

    ds = Datasette(metadata=views.metadata(name), settings=SETTINGS)
    ds.add_database(ReadOnlyLog(ds, path=str(path.resolve()), is_mutable=True), name=name)
    ds.remove_database("_memory")  # added by Datasette when no file is given
    return ds


def with_table_defaults(app: ASGIApp, name: str, hidden: tuple[str, ...]) -> ASGIApp:
    """`app`, but the `requests` table page redirects to its defaults (`table_defaults`:
    the `hidden` columns left out, the last day), which Datasette's metadata cannot say."""

    async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            query = scope.get("query_string", b"").decode("latin-1")
            location = views.table_defaults(scope["path"], query, name, hidden)
            if location:
                headers = [(b"location", location.encode()), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 302, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        await app(scope, receive, send)

    return wrapped


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
