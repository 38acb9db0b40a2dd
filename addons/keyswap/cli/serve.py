"""`keyswap serve`: the gateway under mitmdump (or mitmweb with --web), listening in reverse
mode (--listen), forward mode (--forward, signing with keyswap's CA) or both; with
--workers N, N of them on the same addresses under a small supervisor
(keyswap/cli/workers.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import click

from keyswap.cli.ca import ca_dir_option, ca_or_fail
from keyswap.cli.options import config_option, default_db, load_or_fail
from keyswap.cli.workers import Supervisor, WorkersFailed, workers_value
from keyswap.forward import ca as authority
from keyswap.gateway import script
from keyswap.gateway.reuse_port import ReusePort

# Each worker of --workers N (as `ps` shows it, followed by mitmdump's arguments).
WORKER = "from keyswap.cli.serve import worker; worker()"

# The options keyswap serve sets itself: mitmproxy silently drops a script whose option
# is --set twice, so the same option after -- is refused.
OWN_OPTIONS = ("keyswap_config", "keyswap_db")
# Reverse mode's address when neither --listen nor --forward names one.
DEFAULT_LISTEN = "127.0.0.1:8080"
WEB_PORT = 8081  # mitmweb's UI, unless web_port says otherwise


def parse_listen(listen: str, option: str = "--listen") -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `PORT`."""
    host, sep, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"'{listen}' is not HOST:PORT", param_hint=option)
    return (host.strip("[]") if sep else "127.0.0.1"), int(port)


def listener_args(listen: str | None, forward: tuple[str, Path] | None) -> list[str]:
    """mitmproxy's listeners: reverse mode at `listen`, and forward mode (mitmproxy's
    `regular`) at `forward`'s address, signing with the CA in its folder (mitmproxy's
    confdir)."""
    args = []
    if listen is not None:
        host, port = parse_listen(listen)
        args += ["--mode", f"reverse:http://unused.invalid@{port}", "--listen-host", host]
    if forward is not None:
        address, ca_folder = forward
        host, port = parse_listen(address, "--forward")
        # `regular@HOST:PORT`: mitmproxy splits at the last colon, so an IPv6 host goes
        # without brackets (`regular@::1:8081`); --listen-host stays reverse mode's.
        args += ["--mode", f"regular@{host}:{port}", "--set", f"confdir={ca_folder}"]
    return args


def gateway_script() -> Path:
    """The mitmproxy script inside the package (the same gateway as addons/gateway.py),
    wherever keyswap is installed."""
    return Path(script.__file__)


def serve_args(
    config_path: str,
    listen: str | None,
    db: str | None,
    extra: tuple[str, ...],
    workers: int = 1,
    forward: tuple[str, Path] | None = None,
) -> list[str]:
    """mitmdump's (or mitmweb's) arguments for the gateway; `forward` is forward mode's
    address and CA folder."""
    for name in OWN_OPTIONS:
        if _sets(extra, name):
            raise click.UsageError(f"set {name} with keyswap serve's own option, not after --")
    if forward is not None and _sets(extra, "confdir"):
        raise click.UsageError("set confdir with keyswap serve's --ca-dir, not after --")
    shared = []
    if workers > 1:
        if _sets(extra, "keyswap_reuse_port"):
            raise click.UsageError("--workers sets keyswap_reuse_port itself; drop it after --")
        shared = ["--set", "keyswap_reuse_port=true"]
    return [
        "-s",
        str(gateway_script()),
        *listener_args(listen, forward),
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
    "--listen",
    metavar="HOST:PORT",
    help=f"Serve reverse mode (the front door) here [default: {DEFAULT_LISTEN}, unless "
    "--forward is given alone].",
)
@click.option(
    "--forward",
    metavar="HOST:PORT",
    help="Serve forward (intercepting) mode here: the HTTPS_PROXY of the programs `keyswap "
    "run` starts. See docs/forward.md.",
)
@ca_dir_option
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
    help="Gateway processes serving the listen addresses, balanced by the kernel "
    "(SO_REUSEPORT); auto: one per core. See docs/several-gateways.md.",
)
@click.argument("mitmproxy_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str,
    listen: str | None,
    forward: str | None,
    ca_dir: Path | None,
    db: str | None,
    web: bool,
    workers: int,
    mitmproxy_args: tuple[str, ...],
) -> None:
    """Run the gateway (mitmdump, or mitmweb with --web). Arguments after -- go to mitmproxy.

    It serves reverse mode at --listen, forward mode at --forward (alone, or beside
    --listen), signing the certificates of the origins it intercepts with keyswap's CA
    (made on first use; see `keyswap ca`). With --workers N (N > 1), N mitmdumps serve the
    same addresses and this command supervises them: it restarts one that dies, and on
    SIGTERM or Ctrl-C stops each cleanly.

    \b
    Example:
      keyswap serve --config config/demo.yaml --listen 127.0.0.1:8080 -- --set flow_detail=0
      keyswap serve --config config/demo.yaml --listen 127.0.0.1:8080 --forward 127.0.0.1:8081
      keyswap serve --web --config config/demo.yaml -- --set web_port=9090
      keyswap serve --workers auto --config config/demo.yaml --listen 0.0.0.0:8080
    """
    if web and workers > 1:
        raise click.UsageError(
            "--web runs one mitmweb, whose UI shows the flows of its own process only; it "
            "cannot watch several workers. Use --workers 1 with --web."
        )
    web_port_taken = forward and parse_listen(forward, "--forward")[1] == WEB_PORT
    if web and web_port_taken and not _sets(mitmproxy_args, "web_port"):
        raise click.UsageError(
            f"mitmweb's UI listens on port {WEB_PORT} too: move it with -- --set "
            "web_port=9090, or forward mode with --forward HOST:PORT"
        )
    if ca_dir is not None and forward is None:
        raise click.UsageError("--ca-dir names forward mode's CA: give --forward HOST:PORT too")
    if listen is None and forward is None:
        listen = DEFAULT_LISTEN
    load_or_fail(config_path)  # a clear error before mitmproxy starts
    ca_folder = authority.folder_for(Path(config_path), ca_dir)
    forward_mode = None if forward is None else (forward, ca_folder)
    args = serve_args(config_path, listen, db, mitmproxy_args, workers, forward_mode)
    if forward is not None:
        ca = ca_or_fail(config_path, ca_dir)  # made once here, not by each worker
        click.echo(f"keyswap serve: forward mode on {forward}, CA {ca.cert_path}", err=True)
    if workers > 1:
        where = ", ".join(a for a in (listen, forward and f"forward {forward}") if a)
        click.echo(f"keyswap serve: {workers} workers on {where} (SO_REUSEPORT)", err=True)
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
