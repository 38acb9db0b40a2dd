"""`keyswap test`, `code` and `export`: what a proxy's callers need (a test request through
a running gateway, a code snippet (keyswap.cli.snippets), a deployable bundle)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import click
import httpx
from ruamel.yaml.comments import CommentedMap

from keyswap.cli import snippets
from keyswap.cli.gateways import listener_url
from keyswap.cli.options import config_option, json_option, load_or_fail, print_json
from keyswap.cli.proxies import proxy_or_fail, proxy_urls
from keyswap.config.edit import dump, read_document
from keyswap.config.substitution import is_indirect


def _gateway_url(url: str | None, config_path: str) -> str:
    """--url, else a live gateway of this config (from the state database), else the
    default address."""
    if url:
        return url.rstrip("/")
    return listener_url(config_path, None, "reverse") or _LOCAL


_LOCAL = "http://127.0.0.1:8080"


@click.command("test")
@config_option
@click.argument("pid", metavar="ID")
@click.option("--method", default="GET", show_default=True)
@click.option("--path", default="/", show_default=True, help="Path after the proxy's route.")
@click.option("--data", help="Request body.")
@click.option(
    "--url", help="The gateway [default: a running one on this config, else http://127.0.0.1:8080]."
)
@click.option("--token", envvar="KEYSWAP_TOKEN", help="A proxy token [default: $KEYSWAP_TOKEN].")
@json_option
def test_proxy(
    config_path: str,
    pid: str,
    method: str,
    path: str,
    data: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Send a request through a running gateway and show what it decided; exit 1 when
    the gateway did not grant it.

    \b
    Example:
      KEYSWAP_TOKEN=ks_... keyswap test crm-prod --path /crm/v3/owners
    """
    config = load_or_fail(config_path).config
    proxy_or_fail(config, pid)
    if not token:
        raise click.UsageError("give the proxy token with --token or $KEYSWAP_TOKEN")
    full = _gateway_url(url, config_path) + config.routes_of(pid)[0] + "/" + path.lstrip("/")
    started = time.perf_counter()
    try:
        r = httpx.request(
            method.upper(), full, headers={"x-proxy-token": token}, content=data, timeout=60
        )
    except httpx.HTTPError as e:
        raise click.ClickException(f"no answer from the gateway at {full}: {e}") from None
    ms = (time.perf_counter() - started) * 1000
    code = r.headers.get("keyswap-proxy-code")
    if as_json:
        print_json(
            {
                "proxy": pid,
                "method": method.upper(),
                "url": full,
                "status": r.status_code,
                "reason": r.reason_phrase,
                "ms": round(ms, 1),
                "proxy_code": code,
                "message": r.headers.get("keyswap-proxy-message"),
                "request_id": r.headers.get("keyswap-request-id"),
                "headers": dict(r.headers.items()),
            }
        )
    else:
        click.echo(f"{method.upper()} {full}")
        click.echo(f"status   {r.status_code} {r.reason_phrase}  ({ms:.0f} ms)")
        click.echo(f"code     {code or '(none)'}")
        click.echo(f"message  {r.headers.get('keyswap-proxy-message', '')}")
        click.echo(f"request  {r.headers.get('keyswap-request-id', '')}")
        for name, value in r.headers.items():
            click.echo(f"  {name}: {value}")
    if code != "proxy-access-granted":
        raise click.ClickException(f"the gateway did not grant the request ({code or '(none)'})")


@click.command("code")
@config_option
@click.argument("pid", metavar="ID")
@click.option("--lang", type=click.Choice(snippets.LANGS), default="curl", show_default=True)
@click.option(
    "--path", help="Path after the proxy's route [default: one its template or rules allow]."
)
@click.option("--method", help="HTTP method [default: one the proxy allows for the path].")
@click.option(
    "--url", help="The gateway's base URL [default: public_base_url, else http://127.0.0.1:8080]."
)
@json_option
def code(
    config_path: str,
    pid: str,
    lang: str,
    path: str | None,
    method: str | None,
    url: str | None,
    as_json: bool,
) -> None:
    """Print a ready-to-paste snippet that calls the proxy: the official SDK of its template
    (openai, anthropic, stripe) where it can take keyswap's URL, else a plain HTTP call,
    to a path the proxy's rules allow. The token comes from $KEYSWAP_TOKEN, never from the
    snippet.

    \b
    Example:
      keyswap code crm-prod --lang python --path /crm/v3/owners
    """
    config = load_or_fail(config_path).config
    proxy = proxy_or_fail(config, pid)
    route = config.routes_of(pid)[0]
    public = proxy_urls(config, pid)
    base = url.rstrip("/") + route if url else public[0] if public else _LOCAL + route
    if path is not None and not path.startswith("/"):
        path = "/" + path
    call, sdk = snippets.choose(proxy, method, path)
    allowed = snippets.allows(proxy, call.method, call.path)
    if not allowed:
        click.echo(
            f"warning: proxy '{pid}' refuses {call.method} {call.path} (its methods or rules);"
            " the gateway will answer 403 or 405",
            err=True,
        )
    text = snippets.snippet(lang, base, call, sdk)
    if as_json:
        print_json(
            {
                "proxy": pid,
                "lang": lang,
                "method": call.method,
                "path": call.path,
                "url": base + call.path,
                "sdk": proxy.template if sdk is not None and sdk.speaks(lang) else None,
                "allowed": allowed,
                "snippet": text,
            }
        )
    else:
        click.echo(text, nl=False)


@click.command("export")
@config_option
@click.argument("pid", metavar="ID")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@json_option
def export(config_path: str, pid: str, out: str, as_json: bool) -> None:
    """Write a folder that hosts one proxy on its own: its config (secrets as ${env:...}),
    a run script, a systemd unit and a README.

    \b
    Example:
      keyswap export crm-prod --out /tmp/crm-prod
    """
    loaded = load_or_fail(config_path)
    config = loaded.config
    proxy = proxy_or_fail(config, pid)
    source = read_document(config_path)
    target_name = proxy.target
    target = config.targets[target_name]
    subset = CommentedMap()
    subset["version"] = 1
    for key in ("environment", "region", "public_base_url", "params"):
        if key in source:
            subset[key] = source[key]
    env_vars: list[str] = []
    credential = _env_only(
        source["credentials"][target.credential], f"{target.credential}", env_vars
    )
    subset["credentials"] = CommentedMap({target.credential: credential})
    if target.upstream_proxy:
        up = CommentedMap(source["upstream_proxies"][target.upstream_proxy])
        if "auth" in up:
            up["auth"] = _env_only(up["auth"], target.upstream_proxy + "_proxy", env_vars)
        subset["upstream_proxies"] = CommentedMap({target.upstream_proxy: up})
    subset["targets"] = CommentedMap({target_name: source["targets"][target_name]})
    subset["proxies"] = CommentedMap({pid: source["proxies"][pid]})
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    text = dump(subset)
    (folder / "keyswap.yaml").write_text(
        f"# keyswap: proxy '{pid}', exported from {loaded.path}\n" + text
    )
    (folder / "run.sh").write_text(
        "#!/bin/sh\n"
        "# Serve this proxy: pip install keyswap, set the variables in README.md, run me.\n"
        'cd "$(dirname "$0")"\n'
        "exec keyswap serve --config keyswap.yaml "
        '--listen "${KEYSWAP_LISTEN:-0.0.0.0:8080}"\n'
    )
    (folder / "run.sh").chmod(0o755)
    (folder / "keyswap.service").write_text(
        f"[Unit]\nDescription=keyswap proxy {pid}\nAfter=network-online.target\n\n"
        f"[Service]\nWorkingDirectory=/opt/keyswap-{pid}\nEnvironmentFile=/etc/keyswap/{pid}.env\n"
        f"ExecStart=/opt/keyswap-{pid}/run.sh\nRestart=on-failure\nDynamicUser=yes\n"
        f"StateDirectory=keyswap-{pid}\nEnvironment=KEYSWAP_DB=/var/lib/keyswap-{pid}/keyswap.db\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    needed = sorted(set(env_vars) | set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", text)))
    (folder / "README.md").write_text(
        f"# keyswap proxy `{pid}`\n\n{proxy.description or proxy.name or ''}\n\n"
        f"Target: {target.base_url}. Routes: {', '.join(config.routes_of(pid))}.\n\n"
        "Set these environment variables (in systemd: the EnvironmentFile), then `./run.sh`:\n\n"
        + "".join(f"- `{v}`\n" for v in needed)
        + "\nCheck the folder with `keyswap check --config keyswap.yaml`. The proxy tokens are\n"
        "stored as digests; rotate them with `keyswap proxies rotate-token`.\n"
    )
    files = ["keyswap.yaml", "run.sh", "keyswap.service", "README.md"]
    if as_json:
        print_json({"proxy": pid, "out": str(folder), "files": files, "env": needed})
        return
    click.echo(f"exported proxy '{pid}' to {folder}: {', '.join(files)}")
    click.echo("environment variables to set: " + ", ".join(needed))


SECRET_FIELDS = ("token", "password", "value", "client_secret", "refresh_token")


def _env_only(node: Any, prefix: str, env_vars: list[str]) -> CommentedMap:
    """A copy of a credential (or auth) mapping whose secrets are all ${env:...}."""
    out = CommentedMap(node)
    for key in SECRET_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and not (is_indirect(value) and "${file:" not in value):
            name = re.sub(r"[^A-Z0-9_]", "_", f"{prefix}_{key}".upper())
            out[key] = "${env:" + name + "}"
            env_vars.append(name)
    return out
