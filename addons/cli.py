"""The `keyswap` command line: a thin click layer over the library modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from keyswap.config import json_schema
from keyswap.loader import ConfigError, LoadedConfig, load_config


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="keyswap")
def main() -> None:
    """keyswap: a credential-swapping API gateway built from mitmproxy addons.

    \b
    Example:
      keyswap check --config config/demo.yaml
    """


@main.command()
@config_option
def check(config_path: str) -> None:
    """Validate a config file: a summary and exit 0, or every error and exit 1.

    \b
    Example:
      keyswap check --config config/keyswap.yaml
    """
    loaded = load_or_fail(config_path)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(summary(loaded))


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


@main.command()
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
