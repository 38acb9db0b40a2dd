"""The OAuth2 token cache: each oauth2 credential's tokens as one `oauth2_tokens` row,
encrypted with a key derived from the credential's client secret (which lives only in
the environment), so the database never holds a usable token.

Token state is committed on its own thread and connection, one row per commit: never
behind the activity log's queue, whose batches a client's request must not be able to
delay or fail. A rotated refresh token is committed before the new access token is
used."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.fernet import Fernet, InvalidToken

from keyswap.config.model import Config, OAuth2Credential
from keyswap.state import migrations
from keyswap.state.backends import Backend, Session, StateError, open_backend
from keyswap.state.store import iso

logger = logging.getLogger(__name__)

TABLE = "oauth2_tokens"
T = TypeVar("T")


@dataclass
class TokenState:
    """What keyswap knows about one credential's tokens (never logged or shown whole)."""

    access_token: str | None = None
    expires_at: float = 0.0
    refresh_token: str | None = None  # the rotated one, when the server rotated it
    config_refresh: str | None = None  # the config's refresh token this state grew from
    refreshed_at: str | None = None
    error: str | None = None
    error_at: float = 0.0
    terminal: bool = False
    version: int = 0  # the stored row's version this state is (0: none stored yet)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def adopt(self, other: TokenState, version: int | None = None) -> None:
        """Take `other`'s tokens and status (and its version, unless given)."""
        self.access_token, self.expires_at = other.access_token, other.expires_at
        self.refresh_token, self.config_refresh = other.refresh_token, other.config_refresh
        self.refreshed_at, self.error = other.refreshed_at, other.error
        self.error_at, self.terminal = other.error_at, other.terminal
        self.version = other.version if version is None else version

    def public(self) -> dict[str, Any]:
        """For health and `check --live`: no token, only times and errors."""
        return {
            "valid_until": iso(self.expires_at) if self.access_token else None,
            "refreshed_at": self.refreshed_at,
            "error": self.error,
            "terminal": self.terminal,
        }


def cache_key(name: str, credential: OAuth2Credential) -> Fernet:
    """The cache's encryption key: only someone with the client secret can read it."""
    secret = credential.client_secret.get_secret_value().encode()
    digest = hashlib.sha256(b"keyswap oauth2 cache\0" + name.encode() + b"\0" + secret).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def load_states(session: Session, config: Config) -> dict[str, TokenState]:
    """The cached state of every oauth2 credential the config still defines; an entry that
    cannot be decrypted (the client secret changed) is skipped and refetched."""
    rows = session.query(f"select * from {TABLE}") if migrations.version(session) else []  # noqa: S608
    states: dict[str, TokenState] = {}
    for row in rows:
        credential = config.credentials.get(row["credential"])
        if isinstance(credential, OAuth2Credential):
            state = state_of(row, credential)
            if state is not None:
                states[row["credential"]] = state
    return states


def state_of(row: dict[str, Any], credential: OAuth2Credential) -> TokenState | None:
    """The state an `oauth2_tokens` row holds; None when it cannot be decrypted (the
    client secret changed: the tokens are fetched again)."""
    try:
        data = json.loads(
            cache_key(row["credential"], credential).decrypt(row["ciphertext"].encode())
        )
    except (InvalidToken, ValueError, AttributeError):
        logger.warning(
            "keyswap: cached oauth2 token for '%s' is unreadable; refetching", row["credential"]
        )
        return None
    return TokenState(
        access_token=data.get("access_token"),
        expires_at=float(data.get("expires_at", 0)),
        refresh_token=data.get("refresh_token"),
        config_refresh=data.get("config_refresh"),
        refreshed_at=row.get("refreshed_at"),
        error=row.get("error"),
        error_at=float(data.get("error_at", 0)),
        terminal=bool(row.get("terminal")),
        version=int(row.get("version") or 0),
    )


def token_row(name: str, credential: OAuth2Credential, state: TokenState) -> dict[str, Any]:
    """The `oauth2_tokens` row for a credential's state: tokens only in the ciphertext."""
    secret = {
        "access_token": state.access_token,
        "expires_at": state.expires_at,
        "refresh_token": state.refresh_token,
        "config_refresh": state.config_refresh,
        "error_at": state.error_at,
    }
    return {
        "credential": name,
        "ciphertext": cache_key(name, credential).encrypt(json.dumps(secret).encode()).decode(),
        "expires_at": iso(state.expires_at) if state.access_token else None,
        "refreshed_at": state.refreshed_at,
        "error": state.error,
        "terminal": int(state.terminal),
    }


class TokenStore:
    """Commits token state to the state database, off the event loop, on a backend (so a
    connection) of its own."""

    def __init__(self, db: str | Path) -> None:
        self.db = db
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="keyswap-oauth2")
        self._backend: Backend | None = None  # opened and used on the executor's thread

    def load(self, config: Config) -> dict[str, TokenState]:
        """The cached states; none when the database cannot be read (said in the log:
        the tokens are fetched again)."""
        try:
            return self._executor.submit(self._load, config).result()
        except StateError as e:
            logger.warning("keyswap: cannot read the oauth2 token cache: %s", e)
            return {}

    def _load(self, config: Config) -> dict[str, TokenState]:
        with self._opened().session() as session:
            return load_states(session, config)

    # Across every gateway sharing the database, one refresh per credential at a time:
    # a refresher holds the row's lease (owner and expiry) while it calls the token
    # endpoint, and commits its result compare-and-swap on the row's version, so that one
    # that stalled past its lease cannot overwrite a newer token.

    async def read(self, name: str, credential: OAuth2Credential) -> TokenState | None:
        """The stored state (None: nothing readable stored)."""
        return await self._run(self._read, name, credential)

    async def take_lease(
        self, name: str, credential: OAuth2Credential, owner: str, seconds: float
    ) -> TokenState | None:
        """The stored state with the lease now held by `owner` for `seconds`, or None when
        another owner holds an unexpired lease."""
        return await self._run(self._take_lease, name, credential, owner, seconds)

    async def release(self, name: str, owner: str) -> None:
        """Give the lease back without a new state."""
        await self._run(self._release, name, owner)

    async def commit(
        self, name: str, credential: OAuth2Credential, state: TokenState, version: int
    ) -> int | None:
        """Store `state` if the row is still at `version` (and end any lease): its new
        version, or None when another gateway stored a state meanwhile."""
        row = token_row(name, credential, state)
        return await self._run(self._commit, row, version)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def _read(self, name: str, credential: OAuth2Credential) -> TokenState | None:
        with self._opened().session() as session:
            rows = session.query(f"select * from {TABLE} where credential = ?", [name])  # noqa: S608
        return state_of(rows[0], credential) if rows else None

    def _take_lease(
        self, name: str, credential: OAuth2Credential, owner: str, seconds: float
    ) -> TokenState | None:
        now = time.time()
        empty = token_row(name, credential, TokenState())
        with self._opened().session() as session, session.transaction():
            session.execute(
                f"insert into {TABLE} (credential, ciphertext, terminal, version)"  # noqa: S608
                " values (?, ?, 0, 0) on conflict (credential) do nothing",
                [name, empty["ciphertext"]],
            )
            taken = session.execute(
                f"update {TABLE} set lease_owner = ?, lease_until = ?"  # noqa: S608
                " where credential = ?"
                " and (lease_owner is null or lease_until < ? or lease_owner = ?)",
                [owner, iso(now + seconds), name, iso(now), owner],
            )
            if not taken:
                return None
            rows = session.query(f"select * from {TABLE} where credential = ?", [name])  # noqa: S608
        state = state_of(rows[0], credential)
        # An unreadable row (the client secret changed) is taken as empty, at its version.
        return state or TokenState(version=int(rows[0].get("version") or 0))

    def _release(self, name: str, owner: str) -> None:
        with self._opened().session() as session:
            session.execute(
                f"update {TABLE} set lease_owner = null, lease_until = null"  # noqa: S608
                " where credential = ? and lease_owner = ?",
                [name, owner],
            )

    def _commit(self, row: dict[str, Any], version: int) -> int | None:
        with self._opened().session() as session:
            changed = session.execute(
                f"update {TABLE} set ciphertext = ?, expires_at = ?, refreshed_at = ?,"  # noqa: S608
                " error = ?, terminal = ?, version = version + 1, lease_owner = null,"
                " lease_until = null where credential = ? and version = ?",
                [
                    row["ciphertext"],
                    row["expires_at"],
                    row["refreshed_at"],
                    row["error"],
                    row["terminal"],
                    row["credential"],
                    version,
                ],
            )
        return version + 1 if changed else None

    def _opened(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.db)
        return self._backend

    def close(self) -> None:
        self._executor.submit(self._close).result(timeout=30)
        self._executor.shutdown()

    def _close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
