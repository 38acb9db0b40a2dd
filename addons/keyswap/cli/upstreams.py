"""`keyswap test-upstream` and `keyswap upstreams`: the upstream proxies a config defines,
and whether one can be reached step by step."""

from __future__ import annotations

import click

from keyswap.cli.options import config_option, json_option, load_or_fail, print_json, table
from keyswap.config.model import BasicProxyAuth
from keyswap.gateway.connectivity import ProxyCheck
from keyswap.net.urls import hostport


@click.command("test-upstream")
@config_option
@click.argument("name")
@click.option("--url", help="What to fetch through the proxy (default: a target that uses it).")
@json_option
def test_upstream(config_path: str, name: str, url: str | None, as_json: bool) -> None:
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
    address = f"{proxy.type}://{hostport(proxy.host, proxy.port)}"
    user = proxy.auth.user if isinstance(proxy.auth, BasicProxyAuth) else None
    steps = []
    if not as_json:  # each step as it is taken
        auth = f", basic auth as {user}" if user else ""
        click.echo(f"upstream proxy '{name}': {address}{auth}")
        click.echo(f"fetching {url}")
    for step in check.steps():
        steps.append(step)
        if not as_json:
            mark = "ok    " if step.ok else "FAILED"
            click.echo(f"  {mark} {step.name:<28} {step.detail}  ({step.ms:.0f} ms)")
    failed = next((step for step in steps if not step.ok), None)
    if as_json:
        print_json(
            {
                "upstream_proxy": name,
                "proxy": address,
                "user": user,
                "url": url,
                "ok": failed is None,
                "steps": [
                    {"step": s.name, "ok": s.ok, "detail": s.detail, "ms": round(s.ms, 1)}
                    for s in steps
                ],
            }
        )
    if failed is not None:
        raise click.ClickException(f"'{name}' failed at: {failed.name}")
    if not as_json:
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
@json_option
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
        print_json(rows)
        return
    click.echo(f"environment {config.environment}")
    click.echo(table(rows, ["name", "type", "address", "auth", "targets", "description"]))
