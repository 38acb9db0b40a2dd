"""`keyswap db upgrade` on both backends: a new database, an older SQLite file, one of a
newer version refused."""

import json
from pathlib import Path

from click.testing import CliRunner, Result

from keyswap.cli.main import main
from keyswap.state.backends import open_backend
from keyswap.state.migrations import SCHEMA_VERSION
from tests.state.test_migrations import version_2


def run(db: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["db", "upgrade", "--db", db, *args])


def test_upgrades_once_and_says_from_and_to(state_db: str) -> None:
    shown = open_backend(state_db).shown if "://" in state_db else state_db
    first = run(state_db)
    assert first.exit_code == 0, first.output
    assert first.output == f"{shown}: schema version 0 -> {SCHEMA_VERSION}\n"
    again = json.loads(run(state_db, "--json").output)
    assert again == {
        "db": shown,
        "backend": again["backend"],
        "from": SCHEMA_VERSION,
        "to": SCHEMA_VERSION,
    }
    assert again["backend"] in ("sqlite", "postgresql")
    assert "********" in shown or "://" not in state_db  # the password never shows
    assert run(state_db).output == f"{shown}: schema version {SCHEMA_VERSION}, already current\n"


def test_an_older_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    version_2(path)
    result = run(str(path), "--json")
    assert json.loads(result.output)["from"] == 2


def test_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    run(str(path))
    with open_backend(path) as backend, backend.session() as session:
        session.execute(f"pragma user_version = {SCHEMA_VERSION + 1}")
    result = run(str(path))
    assert result.exit_code == 1
    newer = SCHEMA_VERSION + 1
    assert f"has schema version {newer}, newer than this keyswap knows ({SCHEMA_VERSION})" in (
        result.output
    )
