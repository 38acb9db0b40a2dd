"""`keyswap check` and `keyswap schema`: is a config file valid, and what may it say."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import Any

import click

from keyswap.cli.options import config_option, default_db, load_or_fail
from keyswap.config.loader import LoadedConfig
from keyswap.config.model import OAuth2Credential, json_schema
from keyswap.state.store import open_db


@click.command()
@config_option
@click.option("--live", is_flag=True, help="Also report oauth2 token state from the database.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), help="State database (--live).")
def check(config_path: str, live: bool, db_path: str | None) -> None:
    """Validate a config file: a summary and exit 0, or every error and exit 1.

    With --live, also show each oauth2 credential's token state as the gateway last
    recorded it, and exit 1 when one has a terminal error (such as invalid_grant).

    \b
    Example:
      keyswap check --config config/keyswap.yaml --live
    """
    loaded = load_or_fail(config_path)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(summary(loaded))
    if live:
        oauth2_state(loaded, db_path or str(default_db(config_path)))


def oauth2_state(loaded: LoadedConfig, db_path: str) -> None:
    names = [n for n, c in loaded.config.credentials.items() if isinstance(c, OAuth2Credential)]
    states: dict[str, dict[str, Any]] = {}
    if Path(db_path).exists():
        with closing(open_db(db_path)) as db:
            states = {r["credential"]: r for r in db["oauth2_tokens"].rows}
    broken = []
    for name in names:
        state = states.get(name)
        if state is None:
            click.echo(f"  oauth2 {name}: no token fetched yet")
        elif state["error"]:
            kind = "terminal, fix the credential" if state["terminal"] else "will retry"
            click.echo(f"  oauth2 {name}: last refresh failed: {state['error']} ({kind})")
            broken += [name] if state["terminal"] else []
        else:
            click.echo(f"  oauth2 {name}: token valid until {state['expires_at']}")
    if broken:
        raise click.ClickException(f"oauth2 credentials need attention: {', '.join(broken)}")


def summary(loaded: LoadedConfig) -> str:
    c = loaded.config
    region = f", region {c.region}" if c.region else ""
    counts = ", ".join(
        _count(len(section), word)
        for section, word in (
            (c.upstream_proxies, "upstream proxy"),
            (c.credentials, "credential"),
            (c.targets, "target"),
            (c.proxies, "proxy"),
        )
    )
    served = sum(c.serves(p) for p in c.proxies)
    lines = [
        f"{loaded.path}: OK (environment {c.environment}{region})",
        f"  {counts} ({served} served here)",
    ]
    for pid, proxy in c.proxies.items():
        target = c.targets[proxy.target]
        via = f" via {target.upstream_proxy}" if target.upstream_proxy else ""
        state = "" if proxy.active else " [disabled]"
        if not c.serves(pid):
            state += " [not served here]"
        routes = ", ".join(c.routes_of(pid))
        lines.append(f"  {pid}: {routes} -> {proxy.target} ({target.base_url}){via}{state}")
    return "\n".join(lines)


@click.command()
def schema() -> None:
    """Print the JSON Schema of the config file (config/keyswap.schema.json is this output).

    \b
    Example:
      keyswap schema > config/keyswap.schema.json
    """
    click.echo(schema_json())


def schema_json() -> str:
    return json.dumps(json_schema(), indent=2)


def _count(n: int, word: str) -> str:
    plural = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{n} {word if n == 1 else plural}"
