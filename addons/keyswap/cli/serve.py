"""`keyswap serve`: the gateway under mitmdump (or mitmweb with --web)."""

from __future__ import annotations

from pathlib import Path

import click

from keyswap.cli.options import config_option, default_db, load_or_fail
from keyswap.gateway import script


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `PORT`."""
    host, sep, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"'{listen}' is not HOST:PORT", param_hint="--listen")
    return (host.strip("[]") if sep else "127.0.0.1"), int(port)


def gateway_script() -> Path:
    """The mitmproxy script inside the package (the same gateway as addons/gateway.py),
    wherever keyswap is installed."""
    return Path(script.__file__)


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


@click.command(context_settings={"ignore_unknown_options": True})
@config_option
@click.option(
    "--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on."
)
@click.option("--db", type=click.Path(dir_okay=False), help="State database (activity log).")
@click.option(
    "--web",
    is_flag=True,
    help="Run mitmweb instead of mitmdump, to watch flows live. Its UI is on "
    "127.0.0.1:8081 (-- --set web_port=PORT), at the URL with a token that mitmweb prints "
    "at start (or set -- --set web_password=...).",
)
@click.argument("mitmproxy_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str, listen: str, db: str | None, web: bool, mitmproxy_args: tuple[str, ...]
) -> None:
    """Run the gateway (mitmdump, or mitmweb with --web). Arguments after -- go to mitmproxy.

    \b
    Example:
      keyswap serve --config config/demo.yaml --listen 127.0.0.1:8080 -- --set flow_detail=0
      keyswap serve --web --config config/demo.yaml -- --set web_port=9090
    """
    from mitmproxy.tools import main as mitm

    load_or_fail(config_path)  # a clear error before mitmproxy starts
    args = serve_args(config_path, listen, db, mitmproxy_args)
    if web:
        mitm.mitmweb(args)
    else:
        mitm.mitmdump(args)
