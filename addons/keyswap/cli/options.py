"""What the `keyswap` commands share: the --config, --db and --json options, loading the
config with every error shown, opening the state backend, tables, JSON, and how Ctrl-C
ends a command."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from keyswap.config.loader import ConfigError, LoadedConfig, load_config
from keyswap.state import migrations
from keyswap.state.backends import Backend, StateError, is_url, open_backend

F = TypeVar("F", bound=Callable[..., Any])


def default_config() -> str:
    return os.environ.get("KEYSWAP_CONFIG", "config/keyswap.yaml")


def default_db(config_path: str | Path) -> str:
    """`$KEYSWAP_DB`, else `keyswap.db` beside the config file: an SQLite file's path or a
    PostgreSQL URL (text: a Path would fold the URL's `//`)."""
    return os.environ.get("KEYSWAP_DB") or str(Path(config_path).parent / "keyswap.db")


config_option = click.option(
    "--config",
    "config_path",
    default=default_config,
    show_default="$KEYSWAP_CONFIG or config/keyswap.yaml",
    type=click.Path(dir_okay=False),
    help="The keyswap YAML file.",
)


def load_or_fail(path: str) -> LoadedConfig:
    """Load the config, or exit 1 listing every problem."""
    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            click.echo(f"error: {problem}", err=True)
        n = len(e.problems)
        raise click.ClickException(f"{path} is invalid ({n} error{'s' * (n != 1)})") from None


def table(
    rows: list[dict[str, object]],
    columns: list[str],
    *,
    widths: dict[str, int] | None = None,
    header: bool = True,
) -> str:
    """A plain text table; lists are joined with commas, documents shown as JSON. Given
    `widths`, columns are at least that wide and `widths` grows to fit: a table printed
    in parts (`keyswap logs --follow`) stays aligned."""

    def cell(value: object) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value))
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        return "" if value is None else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    known = widths if widths is not None else {}
    for i, c in enumerate(columns):
        known[c] = max([known.get(c, 0), len(c), *(len(r[i]) for r in cells)])
    sizes = [known[c] for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, sizes, strict=True))]
    lines = lines if header else []
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, sizes, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON: one document (docs/operations.md, JSON output).",
)


def print_json(value: object, *, line: bool = False) -> None:
    """How every command prints JSON: one document, indented; with `line`, one compact
    line (JSON Lines, for a stream such as `keyswap logs --follow --json`). Times are ISO
    8601 text; a document held as JSON text must be decoded before it gets here."""
    click.echo(json.dumps(value, indent=None if line else 2, ensure_ascii=False, default=_plain))


def _plain(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def end_on_interrupt() -> NoReturn:
    """Ctrl-C: end at once and quietly, the way `tail -f` does, by SIGINT itself, so the
    shell reports 130 and a script that ran the command stops too (a program that
    catches SIGINT and exits normally lets the script go on)."""
    with suppress(OSError):  # stdout may be a pipe that is already gone
        sys.stdout.flush()
    if os.name == "posix":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(130)


class Commands(click.Group):
    """The root group: Ctrl-C ends any command quietly (`end_on_interrupt`) instead of
    click's "Aborted!" and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            end_on_interrupt()


DB_HELP = (
    "State database: an SQLite file or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"
    " [default: $KEYSWAP_DB, else keyswap.db beside the config]."
)
db_option = click.option("--db", "db_path", metavar="PATH|URL", help=DB_HELP)


@contextmanager
def connected(config_path: str | Path, db_path: str | None, *, create: bool) -> Iterator[Backend]:
    """The state backend at --db (or its default), closed at the end of the block; any
    state error in the block ends the command with its message (never a password).
    Without `create`, an SQLite file must exist already."""
    db = db_path or default_db(config_path)
    if not create and not is_url(db) and not Path(db).exists():
        raise click.ClickException(
            f"no activity log at {db}; pass --db (or set KEYSWAP_DB) to the gateway's database"
        )
    try:
        backend = open_backend(db)
    except StateError as e:
        raise click.ClickException(str(e)) from None
    try:
        yield backend
    except StateError as e:
        raise click.ClickException(str(e)) from None
    finally:
        backend.close()


@contextmanager
def reading(config_path: str | Path, db_path: str | None) -> Iterator[Backend]:
    """`connected`, for a command that only reads: the database must exist, and an
    existing schema is read as it is (`migrations.for_reading`)."""
    with connected(config_path, db_path, create=False) as backend:
        migrations.for_reading(backend)
        yield backend


def since_option(help_text: str) -> Callable[[F], F]:
    return click.option("--since", help=help_text + " (15m, 2h, 1d or an ISO time).")


def fail_on_value_error[T](action: Callable[[], T]) -> T:
    try:
        return action()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
