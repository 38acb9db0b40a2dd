"""The gateway's options and its live configuration: loaded at start (an invalid
file stops the gateway), polled for changes (an invalid change keeps the old one)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ProxyMode, RegularMode, ReverseMode

from keyswap.config.loader import ConfigError, ConfigSource, LoadedConfig
from keyswap.gateway.runtime import Runtime

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5


class Settings:
    """Declares keyswap's options, checks mitmproxy's, and holds the served config."""

    def __init__(self) -> None:
        self.source: ConfigSource | None = None
        self.runtime = Runtime(None)
        self._watch: asyncio.Task[None] | None = None
        # Called with (loaded config | None, errors) after every reload attempt.
        self.on_reload: list[Callable[[LoadedConfig | None, list[str]], None]] = []

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "keyswap_config", str, "", "keyswap's YAML configuration file (required)."
        )
        loader.add_option(
            "keyswap_db",
            str,
            "",
            "keyswap's state database: an SQLite file (default: keyswap.db beside the "
            "config) or postgresql://USER@HOST[:PORT]/DB.",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"keep_host_header", "stream_large_bodies", *UNCHECKED_TRAFFIC}:
            check_options()
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Eager mode would connect to the reverse-mode placeholder before routing.
            ctx.options.update(connection_strategy="lazy")
        if "rawtcp" in updated and ctx.options.rawtcp:
            # mitmproxy would pass bytes that do not look like HTTP (a request whose first
            # read is `GET`), and a non-WebSocket 101, on as raw TCP: past every check.
            ctx.options.update(rawtcp=False)
        if updated & {"mode", "listen_host", "listen_port"}:
            opts = ctx.options
            if changes := listen_options(opts.mode, opts.listen_host, opts.listen_port):
                ctx.options.update(**changes)
        if "web_columns" in updated and not ctx.options.has_changed("web_columns"):
            ctx.options.update(web_columns=with_decision_column(ctx.options.web_columns))
        if "keyswap_config" in updated and ctx.options.keyswap_config:
            path = ctx.options.keyswap_config
            try:
                source = ConfigSource(path)
            except ConfigError as e:
                raise exceptions.OptionsError(
                    f"keyswap: {path} is invalid:\n" + "\n".join(str(p) for p in e.problems)
                ) from None
            self.source = source
            self.runtime = Runtime.build(source.current)
            for warning in source.current.warnings:
                logger.warning("keyswap: %s", warning)
            logger.info("keyswap: serving %s (%s)", path, _describe(source.current))

    def running(self) -> None:
        # Checked here, not in configure: a rollback to mitmproxy's default mode would
        # fail the same check again. An error logged at start-up makes mitmproxy exit 1.
        if problem := mode_problem(ctx.options.mode):
            logger.error("keyswap: %s", problem)
            return
        if self.source is None:
            logger.error(
                "keyswap: no configuration; start with --set keyswap_config=config/keyswap.yaml"
            )
            return
        self._watch = asyncio.get_running_loop().create_task(self._poll_forever())

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            self.reload()

    def reload(self) -> None:
        """Pick up a changed config file; keep serving the old one if it is invalid."""
        assert self.source is not None
        try:
            loaded = self.source.poll()
        except ConfigError as e:
            errors = [str(p) for p in e.problems]
            for error in errors:
                logger.error("keyswap: reload failed, still serving the previous config: %s", error)
            self._notify(None, errors)
            return
        except Exception:
            logger.exception("keyswap: reload failed, still serving the previous config")
            return
        if loaded is None:
            return
        self.runtime = Runtime.build(loaded)
        for warning in loaded.warnings:
            logger.warning("keyswap: %s", warning)
        logger.info("keyswap: reloaded %s (%s)", loaded.path, _describe(loaded))
        self._notify(loaded, [])

    def _notify(self, loaded: LoadedConfig | None, errors: list[str]) -> None:
        for callback in self.on_reload:
            try:
                callback(loaded, errors)
            except Exception:
                logger.exception("keyswap: reload listener failed")

    def db_path(self) -> str:
        """The state database: the option (a path or a PostgreSQL URL, kept as text: a
        Path would fold the URL's `//`), else keyswap.db beside the config file."""
        if ctx.options.keyswap_db:
            return str(ctx.options.keyswap_db)
        return str(Path(ctx.options.keyswap_config).parent / "keyswap.db")


def mode_problem(modes: list[str]) -> str | None:
    """keyswap's listeners are reverse (its front door) or regular (forward mode, for
    programs behind HTTPS_PROXY); no other mode knows where a request may go."""
    if modes and all(isinstance(ProxyMode.parse(m), (ReverseMode, RegularMode)) for m in modes):
        return None
    return (
        "keyswap listens in reverse mode (--mode reverse:http://unused.invalid@8080) and "
        f"forward mode (--mode regular@8081), no other (got {modes})"
    )


def listen_options(modes: Sequence[str], host: str, port: int | None) -> dict[str, Any]:
    """The listen_host and listen_port that say where the first listener is, when its
    mode names the address itself (`reverse:...@127.0.0.1:8080`). mitmweb's status bar
    shows those two options only, so it would show mitmproxy's default port instead."""
    try:
        mode = ProxyMode.parse(modes[0])
    except (IndexError, ValueError):
        return {}  # no mode, or an invalid one: mitmproxy's proxyserver says so
    changes: dict[str, Any] = {}
    if mode.custom_listen_host is not None and mode.custom_listen_host != host:
        changes["listen_host"] = mode.custom_listen_host
    if mode.custom_listen_port is not None and mode.custom_listen_port != port:
        changes["listen_port"] = mode.custom_listen_port
    return changes


def with_decision_column(columns: Sequence[str]) -> list[str]:
    """mitmweb's flow list columns with `comment`, where keyswap says what it decided
    (`proxy · code`), beside the status."""
    if "comment" in columns:
        return list(columns)
    at = columns.index("status") + 1 if "status" in columns else len(columns)
    return [*columns[:at], "comment", *columns[at:]]


# mitmproxy options that send a connection past keyswap's stages as raw TCP or UDP:
# forward mode's passthrough is `forward.passthrough`, decided by the config.
UNCHECKED_TRAFFIC = ("ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts")


def check_options() -> None:
    """Refuse mitmproxy settings that would undo what keyswap does per request."""
    for name in UNCHECKED_TRAFFIC:
        if getattr(ctx.options, name):
            raise exceptions.OptionsError(
                f"keyswap checks every request; unset {name} (forward mode tunnels hosts "
                "untouched with forward.passthrough in the config)"
            )
    if ctx.options.keep_host_header:
        raise exceptions.OptionsError(
            "keyswap rewrites the Host header for each target; unset keep_host_header"
        )
    if ctx.options.stream_large_bodies:
        raise exceptions.OptionsError(
            "keyswap decides streaming per request; unset stream_large_bodies"
        )


def _describe(loaded: LoadedConfig) -> str:
    c = loaded.config
    served = sum(c.serves(p) for p in c.proxies)
    return f"environment {c.environment}, {served} of {len(c.proxies)} proxies served"
