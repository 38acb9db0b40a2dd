"""The OAuth2 token cache: each oauth2 credential's tokens as one `oauth2_tokens` row,
encrypted with a key derived from the credential's client secret (which lives only in
the environment), so the database never holds a usable token.

Token state is committed on its own thread and connection, one row per commit: never
behind the activity log's queue, whose batches a client's request must not be able to
delay or fail. A rotated refresh token is on disk before the new access token is used."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlite_utils import Database

from keyswap.config.model import Config, OAuth2Credential
from keyswap.state.store import iso, open_db

logger = logging.getLogger(__name__)

TABLE = "oauth2_tokens"


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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

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


def load_states(db_path: Path, config: Config) -> dict[str, TokenState]:
    """The cached state of every oauth2 credential the config still defines; an entry that
    cannot be decrypted (the client secret changed) is skipped and refetched."""
    db = open_db(db_path)
    try:
        rows = list(db[TABLE].rows) if db[TABLE].exists() else []
    finally:
        db.close()
    states: dict[str, TokenState] = {}
    for row in rows:
        credential = config.credentials.get(row["credential"])
        if not isinstance(credential, OAuth2Credential):
            continue
        try:
            data = json.loads(
                cache_key(row["credential"], credential).decrypt(row["ciphertext"].encode())
            )
        except (InvalidToken, ValueError):
            logger.warning(
                "keyswap: cached oauth2 token for '%s' is unreadable; refetching",
                row["credential"],
            )
            continue
        states[row["credential"]] = TokenState(
            access_token=data.get("access_token"),
            expires_at=float(data.get("expires_at", 0)),
            refresh_token=data.get("refresh_token"),
            config_refresh=data.get("config_refresh"),
            refreshed_at=row.get("refreshed_at"),
            error=row.get("error"),
            terminal=bool(row.get("terminal")),
        )
    return states


def token_row(name: str, credential: OAuth2Credential, state: TokenState) -> dict[str, Any]:
    """The `oauth2_tokens` row for a credential's state: tokens only in the ciphertext."""
    secret = {
        "access_token": state.access_token,
        "expires_at": state.expires_at,
        "refresh_token": state.refresh_token,
        "config_refresh": state.config_refresh,
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
    """Commits token state to the state database, off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="keyswap-oauth2")
        self._db: Database | None = None  # used on the executor's thread only

    def load(self, config: Config) -> dict[str, TokenState]:
        return load_states(self.path, config)

    async def save(self, name: str, credential: OAuth2Credential, state: TokenState) -> None:
        """Commit `state`; returns once it is on disk (raises when it could not be)."""
        row = token_row(name, credential, state)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, row)

    def _write(self, row: dict[str, Any]) -> None:
        if self._db is None:
            self._db = open_db(self.path)
        columns = ", ".join(f'"{c}"' for c in row)
        marks = ", ".join("?" * len(row))
        with self._db.conn:  # one statement, one transaction: it waits on the busy timeout
            self._db.conn.execute(
                f"insert or replace into {TABLE} ({columns}) values ({marks})",  # noqa: S608 (our names)
                list(row.values()),
            )

    def close(self) -> None:
        self._executor.submit(self._close).result(timeout=30)
        self._executor.shutdown()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
