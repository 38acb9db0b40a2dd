"""The OAuth2 token cache on both backends: committed on its own thread and connection,
encrypted, read back at start, and a later state replacing the earlier one."""

import asyncio
import threading
import time

import pytest

from keyswap.config.model import Config, OAuth2Credential
from keyswap.state import oauth2_tokens
from keyswap.state.backends import Backend
from keyswap.state.oauth2_tokens import TokenState, TokenStore

CONFIG = Config.model_validate(
    {
        "credentials": {
            "hub": {
                "type": "oauth2",
                "grant": "refresh_token",
                "token_url": "https://auth.example/token",
                "client_id": "app",
                "client_secret": "client-secret-1",
                "refresh_token": "refresh-from-config",
            }
        }
    }
)
HUB = CONFIG.credentials["hub"]
assert isinstance(HUB, OAuth2Credential)


def state(access: str, refresh: str | None = None) -> TokenState:
    return TokenState(
        access_token=access,
        expires_at=time.time() + 3600,
        refresh_token=refresh,
        config_refresh="refresh-from-config",
        refreshed_at="2026-11-30T10:00:00.000Z",
    )


def test_token_state_is_committed_encrypted_and_read_back(
    backend: Backend, state_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    commit = TokenStore._commit

    def traced(self: TokenStore, row: dict[str, object], version: int) -> int | None:
        threads.append(threading.current_thread().name)
        return commit(self, row, version)

    monkeypatch.setattr(TokenStore, "_commit", traced)
    store = TokenStore(state_db)
    assert store.load(CONFIG) == {}
    lease = asyncio.run(store.take_lease("hub", HUB, "gw-1", 30))
    assert lease is not None and lease.version == 0 and lease.access_token is None
    assert asyncio.run(store.commit("hub", HUB, state("access-1", "rotated-1"), 0)) == 1
    assert asyncio.run(store.commit("hub", HUB, state("access-2", "rotated-2"), 1)) == 2
    store.close()
    assert threads and {t.split("_")[0] for t in threads} == {"keyswap-oauth2"}
    with backend.session() as session:
        rows = session.query("select * from oauth2_tokens")
    assert len(rows) == 1 and rows[0]["credential"] == "hub"
    assert rows[0]["version"] == 2 and rows[0]["lease_owner"] is None
    for secret in ("access-2", "rotated-2", "client-secret-1"):
        assert secret not in str(rows[0])
    again = TokenStore(state_db)
    try:
        loaded = again.load(CONFIG)["hub"]
        assert (loaded.access_token, loaded.refresh_token, loaded.version) == (
            "access-2",
            "rotated-2",
            2,
        )
    finally:
        again.close()


def test_one_lease_at_a_time_and_a_stale_commit_never_overwrites(
    backend: Backend, state_db: str
) -> None:
    first, second = TokenStore(state_db), TokenStore(state_db)
    try:
        assert asyncio.run(first.take_lease("hub", HUB, "gw-1", 30)) is not None
        assert asyncio.run(second.take_lease("hub", HUB, "gw-2", 30)) is None
        assert asyncio.run(first.take_lease("hub", HUB, "gw-1", 30)) is not None  # its own
        # gw-1 stalls past its lease: gw-2 takes over and stores a newer token.
        assert asyncio.run(first.take_lease("hub", HUB, "gw-1", -1)) is not None
        taken = asyncio.run(second.take_lease("hub", HUB, "gw-2", 30))
        assert taken is not None and taken.version == 0
        assert asyncio.run(second.commit("hub", HUB, state("access-new"), 0)) == 1
        # gw-1 wakes up with its result: refused, the newer token stays.
        assert asyncio.run(first.commit("hub", HUB, state("access-old"), 0)) is None
        stored = asyncio.run(first.read("hub", HUB))
        assert stored is not None and (stored.access_token, stored.version) == ("access-new", 1)
        # A lease given back without a result frees the credential for the next refresher.
        assert asyncio.run(first.take_lease("hub", HUB, "gw-1", 30)) is not None
        asyncio.run(first.release("hub", "gw-1"))
        assert asyncio.run(second.take_lease("hub", HUB, "gw-2", 30)) is not None
    finally:
        first.close()
        second.close()


def test_an_unreadable_cache_is_said_and_refetched(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    store = TokenStore("postgresql://nobody@127.0.0.1:1/none")
    try:
        assert store.load(CONFIG) == {}
    finally:
        store.close()
    assert "cannot read the oauth2 token cache" in caplog.text


def test_rows_of_credentials_the_config_dropped_are_ignored(backend: Backend) -> None:
    row = oauth2_tokens.token_row("gone", HUB, state("a"))
    with backend.session() as session:
        session.insert("oauth2_tokens", [row])
        assert oauth2_tokens.load_states(session, CONFIG) == {}
