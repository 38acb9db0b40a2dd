"""`keyswap check` and `keyswap schema`: is a config file valid, and what may it say."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from keyswap.cli.options import (
    config_option,
    default_db,
    json_option,
    load_or_fail,
    print_json,
    reading,
)
from keyswap.config.loader import ConfigError, LoadedConfig, load_config
from keyswap.config.model import OAuth2Credential, json_schema
from keyswap.state.backends import is_url


@click.command()
@config_option
@click.option("--live", is_flag=True, help="Also report oauth2 token state from the database.")
@click.option("--db", "db_path", metavar="PATH|URL", help="State database (--live).")
@json_option
def check(config_path: str, live: bool, db_path: str | None, as_json: bool) -> None:
    """Validate a config file: a summary and exit 0, or every error and exit 1.

    With --live, also show each oauth2 credential's token state as the gateway last
    recorded it, and exit 1 when one has a terminal error (such as invalid_grant).

    \b
    Example:
      keyswap check --config config/keyswap.yaml --live
    """
    if as_json:
        check_json(config_path, db_path or default_db(config_path) if live else None)
        return
    loaded = load_or_fail(config_path)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(summary(loaded))
    if live:
        oauth2_state(loaded, db_path or default_db(config_path))


def recorded_tokens(config_path: str | Path, db: str) -> dict[str, dict[str, Any]]:
    """The `oauth2_tokens` rows by credential, as the gateway last recorded them (none
    when there is no database yet)."""
    if not is_url(db) and not Path(db).exists():
        return {}
    with reading(config_path, db) as backend, backend.session() as session:
        return {r["credential"]: r for r in session.query("select * from oauth2_tokens")}


def oauth2_state(loaded: LoadedConfig, db: str) -> None:
    names = [n for n, c in loaded.config.credentials.items() if isinstance(c, OAuth2Credential)]
    states = recorded_tokens(loaded.path, db)
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


def check_json(config_path: str, live_db: str | None) -> None:
    """`check --json`: one document, also for an invalid file (then exit 1)."""
    try:
        loaded = load_config(config_path)
    except ConfigError as e:
        errors = [asdict(p) for p in e.problems]
        print_json({"path": config_path, "valid": False, "errors": errors})
        n = len(errors)
        raise click.ClickException(
            f"{config_path} is invalid ({n} error{'s' * (n != 1)})"
        ) from None
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    c = loaded.config
    document: dict[str, Any] = {
        "path": str(loaded.path),
        "valid": True,
        "digest": loaded.digest,
        "environment": c.environment,
        "region": c.region,
        "warnings": [asdict(w) for w in loaded.warnings],
        "proxies": [
            {
                "id": pid,
                "routes": c.routes_of(pid),
                "target": proxy.target,
                "base_url": c.targets[proxy.target].base_url,
                "upstream_proxy": c.targets[proxy.target].upstream_proxy,
                "active": proxy.active,
                "served": c.serves(pid),
            }
            for pid, proxy in c.proxies.items()
        ],
        "counts": {
            "upstream_proxies": len(c.upstream_proxies),
            "credentials": len(c.credentials),
            "targets": len(c.targets),
            "proxies": len(c.proxies),
        },
    }
    broken = []
    if live_db is not None:
        states = recorded_tokens(config_path, live_db)
        names = [n for n, cred in c.credentials.items() if isinstance(cred, OAuth2Credential)]
        document["oauth2"] = [
            {
                "credential": name,
                "expires_at": states.get(name, {}).get("expires_at"),
                "error": states.get(name, {}).get("error"),
                "terminal": bool(states.get(name, {}).get("terminal")),
            }
            for name in names
        ]
        broken = [o["credential"] for o in document["oauth2"] if o["error"] and o["terminal"]]
    print_json(document)
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
