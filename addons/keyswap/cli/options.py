"""What the `keyswap` commands share: the --config and --db options, loading the config
with every error shown, opening the state database, tables."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlite_utils import Database

from keyswap.config.loader import ConfigError, LoadedConfig, load_config
from keyswap.state.store import open_db

F = TypeVar("F", bound=Callable[..., Any])


def default_config() -> str:
    return os.environ.get("KEYSWAP_CONFIG", "config/keyswap.yaml")


def default_db(config_path: str | Path) -> Path:
    """`$KEYSWAP_DB`, else `keyswap.db` beside the config file."""
    env = os.environ.get("KEYSWAP_DB")
    return Path(env) if env else Path(config_path).parent / "keyswap.db"


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


def table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A plain text table; lists are joined with commas."""

    def cell(value: object) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value))
        return "" if value is None else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(line.rstrip() for line in lines)


db_option = click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False),
    help="State database [default: $KEYSWAP_DB, else keyswap.db beside the config].",
)


def open_log(config_path: str, db_path: str | None) -> Database:
    path = Path(db_path) if db_path else default_db(config_path)
    if not path.exists():
        raise click.ClickException(
            f"no activity log at {path}; pass --db (or set KEYSWAP_DB) to the gateway's database"
        )
    return open_db(path)


def since_option(help_text: str) -> Callable[[F], F]:
    return click.option("--since", help=help_text + " (15m, 2h, 1d or an ISO time).")


def fail_on_value_error[T](action: Callable[[], T]) -> T:
    try:
        return action()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
