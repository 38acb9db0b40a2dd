"""`keyswap templates`: the built-in templates a proxy can be created from."""

from __future__ import annotations

import json

import click

from keyswap.cli.options import table
from keyswap.config.templates import TEMPLATES


@click.group()
def templates() -> None:
    """Built-in templates for well-known APIs.

    \b
    Example:
      keyswap templates list
    """


@templates.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def list_templates(as_json: bool) -> None:
    """List the templates `keyswap proxies create --template` knows.

    \b
    Example:
      keyswap templates list --json
    """
    rows: list[dict[str, object]] = [
        {
            "name": t.name,
            "api": t.title,
            "base_url": t.base_url,
            "credential": t.placement,
            "env": t.env_vars,
            "docs": t.docs,
        }
        for t in TEMPLATES.values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(rows, ["name", "api", "base_url", "credential", "docs"]))
