"""`keyswap gateways`: the live gateways serving a config file, from the registry in
the state database (a thin layer over `keyswap.state.registry`)."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from keyswap.cli.options import (
    config_option,
    db_option,
    default_db,
    json_option,
    print_json,
    reading,
)
from keyswap.cli.options import table as text_table
from keyswap.config.loader import ConfigError, load_config
from keyswap.state.backends import StateError, is_url, open_backend
from keyswap.state.registry import LIVE_WITHIN_S, live_gateways

COLUMNS = ["id", "node", "pid", "listen", "config_digest", "last_seen", "current"]


def listener_url(config_path: str, db_path: str | None, mode: str) -> str | None:
    """The URL of a live gateway's `mode` listener (reverse or forward) for this config,
    one on this node first; None when there is none, or no state database to ask."""
    db = db_path or default_db(config_path)
    if not is_url(db) and not Path(db).exists():
        return None
    try:
        with open_backend(db) as backend:
            running = live_gateways(backend, Path(config_path))
    except StateError:
        return None
    here = socket.gethostname()
    for gateway in sorted(running, key=lambda g: g.node != here):
        if found := gateway.url(mode):
            return found
    return None


@click.command()
@config_option
@db_option
@json_option
def gateways(config_path: str, db_path: str | None, as_json: bool) -> None:
    """List the live gateways serving this config file, on every node that shares the
    database: id, node, pid, listen addresses, the digest of the config each serves, its
    last heartbeat, and whether that is the file's current digest. Exit 1 when they do
    not all serve the same config.

    \b
    Example:
      keyswap gateways --config config/keyswap.yaml --db postgresql://keyswap@db/keyswap
    """
    try:
        current: str | None = load_config(config_path).digest
    except ConfigError:
        current = None
        click.echo(f"warning: {config_path} is invalid: not comparing its digest", err=True)
    with reading(config_path, db_path) as backend:
        found = live_gateways(backend, Path(config_path))
    rows = [
        {**g.public(), "current": None if current is None else g.config_digest == current}
        for g in found
    ]
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo(f"no live gateway serves {config_path} (none seen in {LIVE_WITHIN_S:.0f} s)")
    else:
        shown = [
            {
                **row,
                "listen": [f"{x['mode']} {x['address']}" for x in row["listen"]],
                "config_digest": (row["config_digest"] or "-")[:12],
                "current": {True: "yes", False: "no", None: "?"}[row["current"]],
            }
            for row in rows
        ]
        click.echo(text_table(shown, COLUMNS))
    digests = {g.config_digest for g in found}
    if len(digests) > 1:
        raise click.ClickException(
            f"the live gateways serve {len(digests)} different configs: run `keyswap gateways`"
            " again once they have reloaded, or restart the ones that stay behind"
        )
