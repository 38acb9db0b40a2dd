"""The `keyswap` command line: a thin click layer over the library modules."""

from __future__ import annotations

import json
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import click
from sqlite_utils import Database

import keyswap
from keyswap import queries
from keyswap.cli_proxies import register as register_proxy_commands
from keyswap.cliutil import (
    config_option,
    db_option,
    default_db,
    fail_on_value_error,
    load_or_fail,
    open_log,
    since_option,
    table,
)
from keyswap.config import BasicProxyAuth, OAuth2Credential, json_schema
from keyswap.connectivity import ProxyCheck
from keyswap.loader import ConfigError, LoadedConfig, load_config
from keyswap.store import open_db
from keyswap.upstream import hostport


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


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `PORT`."""
    host, sep, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"'{listen}' is not HOST:PORT", param_hint="--listen")
    return (host.strip("[]") if sep else "127.0.0.1"), int(port)


def gateway_script() -> Path:
    """The mitmproxy entry point, addons/gateway.py, wherever keyswap is installed."""
    return Path(keyswap.__file__).with_name("gateway.py")


def serve_args(config_path: str, listen: str, db: str | None, extra: tuple[str, ...]) -> list[str]:
    host, port = parse_listen(listen)
    for name in ("keyswap_config", "keyswap_db"):
        # mitmproxy silently drops a script whose option is --set twice
        if any(arg.startswith(f"{name}=") for arg in extra):
            raise click.UsageError(f"set {name} with keyswap serve's own option, not after --")
    return [
        "-s",
        str(gateway_script()),
        "--mode",
        f"reverse:http://unused.invalid@{port}",
        "--listen-host",
        host,
        "--set",
        f"keyswap_config={config_path}",
        "--set",
        f"keyswap_db={db or default_db(config_path)}",
        "--set",
        "connection_strategy=lazy",
        *extra,
    ]


@main.command(context_settings={"ignore_unknown_options": True})
@config_option
@click.option(
    "--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on."
)
@click.option("--db", type=click.Path(dir_okay=False), help="State database (activity log).")
@click.option("--web", is_flag=True, help="Run mitmweb instead of mitmdump, for live inspection.")
@click.argument("mitmproxy_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str, listen: str, db: str | None, web: bool, mitmproxy_args: tuple[str, ...]
) -> None:
    """Run the gateway (mitmdump, or mitmweb with --web). Arguments after -- go to mitmproxy.

    \b
    Example:
      keyswap serve --config config/demo.yaml --listen 127.0.0.1:8080 -- --set flow_detail=0
    """
    from mitmproxy.tools import main as mitm

    load_or_fail(config_path)  # a clear error before mitmproxy starts
    args = serve_args(config_path, listen, db, mitmproxy_args)
    if web:
        mitm.mitmweb(args)
    else:
        mitm.mitmdump(args)


@main.command("test-upstream")
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


@main.group()
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


LOG_COLUMNS = [
    "started_at",
    "id",
    "proxy_id",
    "method",
    "status",
    "proxy_code",
    "duration_ms",
    "path",
]


@main.command()
@config_option
@db_option
@click.option("--proxy", help="Only this proxy id.")
@click.option("--status", help="2xx, 4xx, 5xx or an exact status.")
@click.option(
    "--code", type=click.Choice(["proxy-access-granted", "proxy-access-denied", "proxy-error"])
)
@since_option("Only rows since then")
@click.option("--limit", default=50, show_default=True, help="At most this many rows.")
@click.option("--follow", is_flag=True, help="Keep printing new rows (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def logs(
    config_path: str,
    db_path: str | None,
    proxy: str | None,
    status: str | None,
    code: str | None,
    since: str | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Show the activity log, newest last.

    \b
    Example:
      keyswap logs --proxy crm-prod --status 5xx --since 2h
    """
    with closing(open_log(config_path, db_path)) as db:
        follow_log(db, filters_for(proxy, status, code), since, limit, follow, as_json)


def filters_for(proxy: str | None, status: str | None, code: str | None) -> dict[str, Any]:
    return {"proxy": proxy, "status": status, "code": code}


def follow_log(
    db: Database,
    filters: dict[str, Any],
    since: str | None,
    limit: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Print matching rows; with `follow`, keep printing new ones once a second."""
    rows = fail_on_value_error(lambda: queries.logs(db, **filters, since=since, limit=limit))
    header = True
    while True:
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
        elif rows or header:
            lines = table([{c: r[c] for c in LOG_COLUMNS} for r in rows], LOG_COLUMNS)
            click.echo(lines if header else lines.split("\n", 1)[1])
            header = False
        if not follow:
            return
        time.sleep(1)
        if rows:
            rows = queries.logs(db, **filters, after=rows[-1]["id"], limit=10_000)
        else:
            rows = queries.logs(db, **filters, since=since, limit=limit)


@main.command()
@config_option
@db_option
@since_option("Only requests since then")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def stats(config_path: str, db_path: str | None, since: str | None, as_json: bool) -> None:
    """Per proxy: requests, success and error rates, denied, p50/p95/p99 latency, bytes.

    \b
    Example:
      keyswap stats --since 1d
    """
    with closing(open_log(config_path, db_path)) as db:
        rows = fail_on_value_error(lambda: queries.stats(db, since))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["proxy", "requests", "success_rate", "error_rate", "denied"]
    columns += ["p50_ms", "p95_ms", "p99_ms", "bytes_in", "bytes_out"]
    click.echo(table(rows, columns))


@main.command()
@config_option
@db_option
@click.argument("request_id")
def curl(config_path: str, db_path: str | None, request_id: str) -> None:
    """Print a logged request as the equivalent curl command, secrets masked.

    \b
    Example:
      keyswap curl 01a1fdd8e203642913c39c7a4f
    """
    with closing(open_log(config_path, db_path)) as db:
        found = list(db.query("select * from requests where id = ?", [request_id]))
    if not found:
        raise click.ClickException(f"no request {request_id} in the activity log")
    try:
        config = load_config(config_path).config
    except ConfigError:
        config = None  # the command still prints, without the proxy's address
    click.echo(fail_on_value_error(lambda: queries.curl_command(dict(found[0]), config)))


@main.command()
@config_option
@db_option
@since_option("Only entries since then")
@click.option("--resource", help="Only entries about this resource.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(
    config_path: str, db_path: str | None, since: str | None, resource: str | None, as_json: bool
) -> None:
    """Show the audit trail: config reloads and changes made with keyswap.

    \b
    Example:
      keyswap audit --since 1d
    """
    with closing(open_log(config_path, db_path)) as db:
        rows = fail_on_value_error(lambda: queries.audit(db, since, resource))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(table(rows, ["at", "actor", "action", "resource", "detail"]))


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


register_proxy_commands(main)
