"""Shared fixtures: paths of the repository and helpers to write configs; state
databases of both backends (a PostgreSQL cluster for the session, a database per test)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyswap.state import migrations
from keyswap.state.backends import Backend, open_backend
from tests.support.postgres import Postgres, have_postgres, start_postgres


@pytest.fixture
def write_config(tmp_path: Path):
    def write(text: str, name: str = "keyswap.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster for the whole session. Missing PostgreSQL skips the tests
    that need it, except in CI (`CI=true`), where it fails them."""
    if not have_postgres():
        reason = "PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)"
        if _in_ci():
            pytest.fail(f"{reason}: CI runs every PostgreSQL test")
        pytest.skip(reason)
    cluster = start_postgres()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """The URL (password included) of a new, empty PostgreSQL database."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new state database of each backend: an SQLite file's path, a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "keyswap.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def backend(state_db: str) -> Iterator[Backend]:
    """An open backend on `state_db`, its schema current."""
    opened = open_backend(state_db)
    migrations.upgrade(opened)
    yield opened
    opened.close()
