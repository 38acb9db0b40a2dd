"""`keyswap serve`: the gateway under mitmdump (or mitmweb with --web); with --workers N,
N of them on one address under a small supervisor (keyswap/cli/workers.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import click

from keyswap.cli.options import config_option, default_db, load_or_fail
from keyswap.cli.workers import Supervisor, WorkersFailed, workers_value
from keyswap.gateway import script
from keyswap.gateway.reuse_port import ReusePort

# Each worker of --workers N (as `ps` shows it, followed by mitmdump's arguments).
WORKER = "from keyswap.cli.serve import worker; worker()"

# The options keyswap serve sets itself: mitmproxy silently drops a script whose option
# is --set twice, so the same option after -- is refused.
OWN_OPTIONS = ("keyswap_config", "keyswap_db")


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


def serve_args(
    config_path: str, listen: str, db: str | None, extra: tuple[str, ...], workers: int = 1
) -> list[str]:
    host, port = parse_listen(listen)
    for name in OWN_OPTIONS:
        if _sets(extra, name):
            raise click.UsageError(f"set {name} with keyswap serve's own option, not after --")
    shared = []
    if workers > 1:
        if _sets(extra, "keyswap_reuse_port"):
            raise click.UsageError("--workers sets keyswap_reuse_port itself; drop it after --")
        shared = ["--set", "keyswap_reuse_port=true"]
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
        *shared,
        *extra,
    ]


def run_mitmdump(args: list[str]) -> None:
    """mitmdump, in this process, with `keyswap_reuse_port` in place before it binds.

    mitmproxy loads `-s` scripts in a task that runs only once its proxy server has bound
    the listeners (mitmproxy 12.3: the script watcher waits a loop turn, the servers start
    at once), too late for a gateway option to change how they bind. An addon of the
    master itself is configured with the command line's options, before that: so the
    master gets a ReusePort of its own here (the gateway declares the same option too,
    which mitmproxy allows; with the option off it does nothing)."""
    from mitmproxy import options
    from mitmproxy.tools import cmdline, dump, main

    class Dump(dump.DumpMaster):
        def __init__(self, opts: options.Options, **kwargs: Any) -> None:
            super().__init__(opts, **kwargs)
            self.addons.add(ReusePort())

    def extra(parsed: argparse.Namespace) -> dict[str, str]:
        # what mitmproxy's own mitmdump() does with filter expressions
        if not parsed.filter_args:
            return {}
        v = " ".join(parsed.filter_args)
        return {"save_stream_filter": v, "readfile_filter": v, "dumper_filter": v}

    main.run(Dump, cmdline.mitmdump, args, extra)


def worker() -> None:
    """A worker of --workers N: run_mitmdump with this process's arguments."""
    sys.argv[0] = "mitmdump"  # what mitmproxy's messages call it
    run_mitmdump(sys.argv[1:])


def _sets(extra: tuple[str, ...], name: str) -> bool:
    """Whether the arguments after -- set this option (`--set name=value`, or a bool's
    bare `--set name`)."""
    return any(arg == name or arg.startswith(f"{name}=") for arg in extra)


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
@click.option(
    "--workers",
    default="1",
    metavar="N|auto",
    callback=workers_value,
    show_default=True,
    help="Gateway processes serving the listen address, balanced by the kernel "
    "(SO_REUSEPORT); auto: one per core. See docs/several-gateways.md.",
)
@click.argument("mitmproxy_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str,
    listen: str,
    db: str | None,
    web: bool,
    workers: int,
    mitmproxy_args: tuple[str, ...],
) -> None:
    """Run the gateway (mitmdump, or mitmweb with --web). Arguments after -- go to mitmproxy.

    With --workers N (N > 1), N mitmdumps serve the one address and this command supervises
    them: it restarts one that dies, and on SIGTERM or Ctrl-C stops each cleanly.

    \b
    Example:
      keyswap serve --config config/demo.yaml --listen 127.0.0.1:8080 -- --set flow_detail=0
      keyswap serve --web --config config/demo.yaml -- --set web_port=9090
      keyswap serve --workers auto --config config/demo.yaml --listen 0.0.0.0:8080
    """
    if web and workers > 1:
        raise click.UsageError(
            "--web runs one mitmweb, whose UI shows the flows of its own process only; it "
            "cannot watch several workers. Use --workers 1 with --web."
        )
    load_or_fail(config_path)  # a clear error before mitmproxy starts
    args = serve_args(config_path, listen, db, mitmproxy_args, workers)
    if workers > 1:
        click.echo(f"keyswap serve: {workers} workers on {listen} (SO_REUSEPORT)", err=True)
        try:
            code = Supervisor([sys.executable, "-c", WORKER, *args], workers).run()
        except WorkersFailed as e:
            raise click.ClickException(str(e)) from None
        raise SystemExit(code)
    if web:
        from mitmproxy.tools import main as mitm

        mitm.mitmweb(args)
    else:
        run_mitmdump(args)
