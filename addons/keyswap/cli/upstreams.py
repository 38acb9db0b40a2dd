"""`keyswap test-upstream` and `keyswap upstreams`: the upstream proxies a config defines,
and whether one can be reached step by step."""

from __future__ import annotations

import json

import click

from keyswap.cli.options import config_option, load_or_fail, table
from keyswap.config.model import BasicProxyAuth
from keyswap.gateway.connectivity import ProxyCheck
from keyswap.net.urls import hostport


@click.command("test-upstream")
@config_option
@click.argument("name")
@click.option("--url", help="What to fetch through the proxy (default: a target that uses it).")
def test_upstream(config_path: str, name: str, url: str | None) -> None:
    """Connect through an upstream proxy and report each step; exit 1 at the first failure.

    \b
    Example:
      keyswap test-upstream corporate --url https://api.hubapi.com/ --config config/keyswap.yaml
    """
    config = load_or_fail(config_path).config
    proxy = config.upstream_proxies.get(name)
    if proxy is None:
        known = ", ".join(sorted(config.upstream_proxies)) or "none"
        raise click.ClickException(f"no upstream proxy '{name}' (known: {known})")
    users = [t for t in config.targets.values() if t.upstream_proxy == name]
    url = url or (users[0].base_url + "/" if users else None)
    if url is None:
        raise click.ClickException(f"no target uses '{name}'; give --url URL to fetch")
    target_tls = next((t.tls for t in users if url.startswith(t.base_url)), None)
    try:
        check = ProxyCheck(proxy, url, target_tls)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    auth = f", basic auth as {proxy.auth.user}" if isinstance(proxy.auth, BasicProxyAuth) else ""
    click.echo(f"upstream proxy '{name}': {proxy.type}://{hostport(proxy.host, proxy.port)}{auth}")
    click.echo(f"fetching {url}")
    failed = None
    for step in check.steps():
        mark = "ok    " if step.ok else "FAILED"
        click.echo(f"  {mark} {step.name:<28} {step.detail}  ({step.ms:.0f} ms)")
        failed = None if step.ok else step
    if failed is not None:
        raise click.ClickException(f"'{name}' failed at: {failed.name}")
    click.echo("success")


@click.group()
def upstreams() -> None:
    """Upstream proxy connections.

    \b
    Example:
      keyswap upstreams list --config config/keyswap.yaml
    """


@upstreams.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def upstreams_list(config_path: str, as_json: bool) -> None:
    """List upstream proxies, resolved for the current environment, and who uses them.

    \b
    Example:
      KEYSWAP_ENV=prod keyswap upstreams list --config config/keyswap.yaml
    """
    config = load_or_fail(config_path).config
    rows: list[dict[str, object]] = [
        {
            "name": name,
            "description": proxy.description,
            "type": proxy.type,
            "address": hostport(proxy.host, proxy.port),
            "auth": proxy.auth.type,
            "targets": sorted(t for t, v in config.targets.items() if v.upstream_proxy == name),
        }
        for name, proxy in config.upstream_proxies.items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"environment {config.environment}")
    click.echo(table(rows, ["name", "type", "address", "auth", "targets", "description"]))
