"""`keyswap templates`: the built-in templates a proxy can be created from."""

from __future__ import annotations

import click

from keyswap.cli.options import json_option, print_json, table
from keyswap.config.templates import TEMPLATES


@click.group()
def templates() -> None:
    """Built-in templates for well-known APIs.

    \b
    Example:
      keyswap templates list
    """


@templates.command("list")
@json_option
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
        print_json(rows)
    else:
        click.echo(table(rows, ["name", "api", "base_url", "credential", "docs"]))
