"""`keyswap db upgrade`: bring the state database's schema to this keyswap's version (a
thin layer over `keyswap.state.migrations`)."""

from __future__ import annotations

import click

from keyswap.cli.options import config_option, connected, db_option, json_option, print_json
from keyswap.state import migrations


@click.group("db")
def db() -> None:
    """The state database: its schema.

    \b
    Example:
      keyswap db upgrade --db postgresql://keyswap@db.internal/keyswap
    """


@db.command()
@config_option
@db_option
@json_option
def upgrade(config_path: str, db_path: str | None, as_json: bool) -> None:
    """Upgrade the state database's schema to this keyswap's version, keeping every row;
    print the version before and after. The gateway does the same when it starts; run
    it first to choose when the upgrade (its locks, its index builds) happens. A database
    of a newer version is refused (exit 1).

    \b
    Example:
      keyswap db upgrade --db postgresql://keyswap@db.internal/keyswap
    """
    with connected(config_path, db_path, create=True) as backend:
        before, after = migrations.upgrade(backend)
    if as_json:
        print_json({"db": backend.shown, "backend": backend.kind, "from": before, "to": after})
    elif before == after:
        click.echo(f"{backend.shown}: schema version {after}, already current")
    else:
        click.echo(f"{backend.shown}: schema version {before} -> {after}")
