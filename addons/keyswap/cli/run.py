"""`keyswap run -- CMD ARGS...`: CMD with the environment that sends it through a live
gateway's forward listener trusting keyswap's CA (keyswap.forward.environment), and with
--proxy ID the variable its API key is read from set to $KEYSWAP_TOKEN. keyswap run exits
with CMD's status, and passes on the signals that would stop it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import click
from ruamel.yaml.error import YAMLError

from keyswap.cli.ca import ca_dir_option, ca_or_fail
from keyswap.cli.gateways import listener_url
from keyswap.cli.options import config_option, db_option, end_on_interrupt
from keyswap.config.edit import read_document
from keyswap.config.templates import TEMPLATES
from keyswap.config.tokens import SHAPE, digest
from keyswap.forward import environment, trust

TOKEN_VAR = "KEYSWAP_TOKEN"
# What a shell answers for a command it cannot find, or cannot execute.
NOT_FOUND, NOT_EXECUTABLE = 127, 126
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def proxy_entry(config_path: str, pid: str) -> Mapping[str, Any]:
    """Proxy `pid` as the file writes it. Read, not loaded: loading resolves every secret
    of the config, which the shell that starts CMD need not hold (and CMD, which inherits
    that shell's environment, should not see)."""
    try:
        proxies = read_document(config_path).get("proxies") or {}
    except (OSError, ValueError, YAMLError) as e:
        raise click.ClickException(f"cannot read {config_path}: {e}") from None
    if pid not in proxies:
        known = ", ".join(sorted(proxies)) or "none"
        raise click.ClickException(f"no proxy '{pid}' in {config_path} (known: {known})")
    entry: Mapping[str, Any] = proxies[pid]
    return entry


def key_variable(config_path: str, pid: str) -> tuple[str, str]:
    """The variable CMD reads proxy `pid`'s API key from (its template's) and the proxy
    token to put there, from $KEYSWAP_TOKEN."""
    entry = proxy_entry(config_path, pid)
    named = entry.get("template")
    template = TEMPLATES.get(named) if isinstance(named, str) else None
    name = template.key_env_var if template else None
    if template is None or name is None:
        why = (
            f"its template '{template.name}' has no API key (OAuth2)"
            if template
            else "it was not made from a template"
        )
        raise click.ClickException(
            f"keyswap does not know which variable the program of proxy '{pid}' reads its "
            f"key from: {why}. Set it yourself, e.g. API_KEY=${TOKEN_VAR} keyswap run -- CMD"
        )
    token = os.environ.get(TOKEN_VAR, "")
    if not SHAPE.fullmatch(token):
        state = "is not set" if not token else "is not a proxy token (ks_ and 43 characters)"
        raise click.ClickException(
            f"${TOKEN_VAR} {state}: export {TOKEN_VAR} with a token of proxy '{pid}' "
            f"(`keyswap proxies rotate-token {pid}` makes one); keyswap run puts it in {name}"
        )
    if digest(token) not in {str(t.get("sha256")) for t in entry.get("tokens") or []}:
        click.echo(
            f"warning: ${TOKEN_VAR} is not a token of proxy '{pid}' in {config_path}: the "
            "gateway will refuse it",
            err=True,
        )
    return name, token


def forward_proxy(config_path: str, db_path: str | None, via: str | None) -> str:
    """--via, else the forward listener of a live gateway serving this config."""
    if via is not None:
        try:
            return environment.proxy_url(via)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--via") from None
    if found := listener_url(config_path, db_path, "forward"):
        return found
    raise click.ClickException(
        f"no live gateway serving {config_path} listens in forward mode: start one with "
        f"`keyswap serve --config {config_path} --forward HOST:PORT` (with the same --db), "
        "or name a forward listener with --via http://HOST:PORT"
    )


class Child:
    """CMD as a child process, in keyswap run's process group (the terminal's job, as CMD
    alone would be), given the SIGINT and SIGTERM that keyswap run gets."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._early: list[int] = []  # signals that came before CMD started
        self._interrupted = False

    def run(self) -> int:
        """CMD's exit status, as Popen says it (-N: killed by signal N). Raises OSError
        when CMD cannot be started."""
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env)
            for signum in self._early:
                self.proc.send_signal(signum)
            return self.proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None:
            self._early.append(signum)
            return
        if signum == signal.SIGINT and not self._interrupted and self._in_our_group():
            # Ctrl-C at a terminal reaches the whole foreground group, CMD too: passing it
            # on would interrupt CMD twice (many programs stop at once on a second one). A
            # SIGINT sent to keyswap run alone is passed on when it comes again.
            self._interrupted = True
            return
        self.proc.send_signal(signum)

    def _in_our_group(self) -> bool:
        assert self.proc is not None
        try:
            return os.getpgid(self.proc.pid) == os.getpgrp()
        except ProcessLookupError:
            return False


def shell_exports(variables: Mapping[str, str], key: str | None) -> str:
    """`export NAME=VALUE` lines; the key variable names $KEYSWAP_TOKEN, never the token."""
    return "\n".join(
        f'export {name}="${TOKEN_VAR}"' if name == key else f"export {name}={shlex.quote(value)}"
        for name, value in variables.items()
    )


@click.command("run", context_settings={"allow_interspersed_args": False})
@config_option
@db_option
@click.option(
    "--proxy",
    "pid",
    metavar="ID",
    help="Also set the variable the proxy's template reads its API key from "
    "(OPENAI_API_KEY, ...) to $KEYSWAP_TOKEN, a token of that proxy.",
)
@click.option(
    "--via",
    metavar="URL",
    help="The forward listener, http://HOST:PORT [default: a live gateway's, from the "
    "state database].",
)
@ca_dir_option
@click.option(
    "--print-env",
    is_flag=True,
    help='Print the variables as export lines instead of running a command: eval "$(keyswap '
    'run --print-env)".',
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def run(
    config_path: str,
    db_path: str | None,
    pid: str | None,
    via: str | None,
    ca_dir: Path | None,
    print_env: bool,
    command: tuple[str, ...],
) -> None:
    """Run CMD through keyswap's forward mode: HTTPS_PROXY and HTTP_PROXY name a live
    gateway's forward listener (or --via), NO_PROXY is empty, and OpenSSL, Python, curl,
    git and Node trust keyswap's CA (on top of the system's CAs). keyswap run exits with
    CMD's status (128+N when signal N killed it). See docs/forward.md.

    \b
    Example:
      export KEYSWAP_TOKEN=ks_...
      keyswap run --proxy agent-llm -- python agent.py
      keyswap run --via http://127.0.0.1:8081 -- curl -s https://api.openai.com/v1/models
    """
    if print_env and command:
        raise click.UsageError("--print-env prints the variables and runs nothing: drop CMD")
    if not print_env and not command:
        raise click.UsageError("no command to run: keyswap run [OPTIONS] -- CMD [ARGS]...")
    if ca_dir is None and not Path(config_path).is_file():
        # keyswap's CA is found beside the config: a new one made beside a mistyped path
        # would be one that no gateway signs with
        raise click.ClickException(
            f"no config file {config_path}: pass --config (or set KEYSWAP_CONFIG), or --ca-dir"
        )
    proxy = forward_proxy(config_path, db_path, via)
    key_name, token = key_variable(config_path, pid) if pid else (None, "")
    ca = ca_or_fail(config_path, ca_dir)
    try:
        bundle = trust.bundle(ca)
    except OSError as e:
        raise click.ClickException(
            f"cannot write {ca.folder / trust.BUNDLE}: {e} (name a writable CA folder "
            "with --ca-dir)"
        ) from None
    variables = environment.variables(proxy, ca.cert_path, bundle)
    if key_name is not None:
        variables[key_name] = token
    if print_env:
        click.echo(shell_exports(variables, key_name))
        return
    try:
        code = Child(list(command), {**os.environ, **variables}).run()
    except OSError as e:
        click.echo(f"Error: cannot run {command[0]}: {e.strerror or e}", err=True)
        missing = isinstance(e, FileNotFoundError)
        raise SystemExit(NOT_FOUND if missing else NOT_EXECUTABLE) from None
    if code == -signal.SIGINT:
        end_on_interrupt()  # die of SIGINT too, so that a shell script running us stops
    raise SystemExit(128 - code if code < 0 else code)
