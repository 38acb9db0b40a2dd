"""The registry of live gateways: each gateway process keeps a row in `gateways` (which
node, which process, where it listens, which config it serves) fresh with a heartbeat,
so that commands which change the config can wait until every one serves the change,
on one machine or across the nodes of a PostgreSQL backend."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyswap.net.urls import hostport
from keyswap.state import migrations
from keyswap.state.backends import Backend, StateError
from keyswap.state.store import iso

logger = logging.getLogger(__name__)

HEARTBEAT_S = 3.0
# A gateway whose row is older than three heartbeats is gone (or frozen): not waited for.
LIVE_WITHIN_S = 3 * HEARTBEAT_S
# /_keyswap/health calls the database unreachable when no heartbeat was written for this
# long (two missed).
STALE_S = 2 * HEARTBEAT_S
# Rows of gateways that stopped without removing theirs (killed, crashed) are deleted
# when a gateway registers, once they are this old.
FORGET_AFTER_S = 86400.0
_UNSPECIFIED = ("", "0.0.0.0", "::")  # noqa: S104 (what a listener bound to all reports)


@dataclass(frozen=True)
class Gateway:
    """A live gateway as its row says."""

    id: str
    node: str
    pid: int
    listen: list[dict[str, str]]  # [{"mode": "reverse", "address": "127.0.0.1:8080"}]
    config: str
    config_digest: str | None
    started_at: str
    last_seen: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> Gateway:
        try:
            listen = json.loads(row["listen"] or "[]")
        except ValueError:
            listen = []
        return cls(
            row["id"],
            row["node"],
            int(row["pid"]),
            listen,
            row["config"],
            row["config_digest"],
            row["started_at"],
            row["last_seen"],
        )

    def url(self, mode: str = "reverse") -> str | None:
        """Where to reach its first listener of `mode`: reverse (its `/_keyswap/health`)
        or forward (the proxy a program is given). One bound to every address is reached
        on loopback on this node, else at the node's name."""
        for listener in self.listen:
            if listener.get("mode") == mode:
                host, _, port = listener["address"].rpartition(":")
                host = host.strip("[]")
                if host in _UNSPECIFIED:
                    host = "127.0.0.1" if self.node == socket.gethostname() else self.node
                return f"http://{hostport(host, int(port))}"
        return None

    def public(self) -> dict[str, Any]:
        """As `keyswap gateways --json` shows it."""
        return {
            "id": self.id,
            "node": self.node,
            "pid": self.pid,
            "listen": self.listen,
            "config": self.config,
            "config_digest": self.config_digest,
            "started_at": self.started_at,
            "last_seen": self.last_seen,
        }


def address(addr: tuple[Any, ...]) -> str:
    """A socket address as `host:port` (`[v6]:port`)."""
    return hostport(str(addr[0]), int(addr[1]))


def live_gateways(backend: Backend, config_path: Path) -> list[Gateway]:
    """Gateways serving this config file whose heartbeat is recent; on SQLite (one
    machine), also only those whose process still exists."""
    with backend.session() as session:
        if migrations.version(session) < 3:
            return []  # an older schema's rows say too little; its gateways predate this
        cutoff = iso(time.time() - LIVE_WITHIN_S)
        rows = session.query(
            "select * from gateways where config = ? and last_seen >= ? order by id",
            [str(config_path.resolve()), cutoff],
        )
    found = [Gateway.of(r) for r in rows]
    if backend.kind == "sqlite":
        found = [g for g in found if g.node != socket.gethostname() or _alive(g.pid)]
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class Registration:
    """This gateway's row: written at start, refreshed by a heartbeat thread every
    HEARTBEAT_S (and at once after a reload, `refresh`), removed on a clean stop."""

    def __init__(
        self,
        backend: Backend,
        config_path: Path,
        listen: list[dict[str, str]],
        digest: Callable[[], str | None],
    ) -> None:
        self.backend = backend
        self.node = socket.gethostname()
        self.id = f"{self.node}:{os.getpid()}:{os.urandom(3).hex()}"
        self.config = str(config_path.resolve())
        self.listen = listen
        self.digest = digest
        self.started_at = iso(time.time())
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._failing = False
        # What the last heartbeat found: the backend's health, for /_keyswap/health.
        self.latency_s: float | None = None
        self.checked_at: str | None = None
        self.error: str | None = None
        self._ok_at = time.monotonic()  # the last heartbeat that was written
        self._thread = threading.Thread(target=self._run, name="keyswap-registry", daemon=True)

    def start(self) -> None:
        """Register now (a command that looks right after start-up finds the row), then
        keep it fresh. Raises StateError when the row cannot be written."""
        with self.backend.session() as session:
            cutoff = iso(time.time() - FORGET_AFTER_S)
            session.execute("delete from gateways where last_seen < ?", [cutoff])
            self._beat()
        self._thread.start()

    def refresh(self) -> None:
        """Write the row again soon, off the caller's thread (after a reload)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the heartbeat and remove the row."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        try:
            with self.backend.session() as session:
                session.execute("delete from gateways where id = ?", [self.id])
        except StateError as e:
            logger.warning("keyswap: could not remove this gateway from the registry: %s", e)

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "pid": os.getpid(),
            "listen": json.dumps(self.listen),
            "config": self.config,
            "config_digest": self.digest(),
            "started_at": self.started_at,
            "last_seen": iso(time.time()),
        }

    def report(self) -> dict[str, Any]:
        """The backend as the last heartbeat found it: reachable, and how long the
        heartbeat's write took."""
        error = self.error
        silent = time.monotonic() - self._ok_at
        if error is None and silent > STALE_S:
            # A heartbeat that hangs (a database that stopped answering: the driver waits
            # for its timeouts) is no news of a reachable database.
            error = f"no heartbeat written for {silent:.0f} s"
        return {
            "kind": self.backend.kind,
            "db": self.backend.shown,
            "reachable": error is None,
            "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 2),
            "checked_at": self.checked_at,
            "error": error,
        }

    def _beat(self) -> None:
        started = time.perf_counter()
        try:
            with self.backend.session() as session:
                # Written whole: a row removed meanwhile (by hand, or forgotten) comes back.
                session.insert("gateways", [self.row()], replace_on="id")
        except StateError as e:
            self.error, self.latency_s = str(e), None
            raise
        finally:
            self.checked_at = iso(time.time())
        self.error, self.latency_s = None, time.perf_counter() - started
        self._ok_at = time.monotonic()

    def _run(self) -> None:
        while True:
            self._wake.wait(HEARTBEAT_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._beat()
            except StateError as e:
                if not self._failing:  # once per outage, not every heartbeat
                    logger.warning("keyswap: registry heartbeat failed: %s", e)
                self._failing = True
                continue
            if self._failing:
                logger.info("keyswap: registry heartbeat works again")
            self._failing = False
