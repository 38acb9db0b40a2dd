"""`keyswap gateways` on both backends: the live gateways of a config, whether each
serves the file's digest, and exit 1 when they serve different ones."""

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keyswap.cli.main import main
from keyswap.config.loader import load_config
from keyswap.state.backends import Backend
from keyswap.state.store import iso
from tests.support import ROOT


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "keyswap.yaml"
    path.write_text((ROOT / "config" / "demo.yaml").read_text())
    return path


def run(config: Path, db: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["gateways", "--config", str(config), "--db", db, *args])


def register(backend: Backend, config: Path, gateway_id: str, digest: str, ago: float = 0) -> None:
    row = {
        "id": gateway_id,
        "node": gateway_id.split(":")[0],
        "pid": int(gateway_id.split(":")[1]),
        "listen": json.dumps([{"mode": "reverse", "address": "0.0.0.0:8080"}]),
        "config": str(config.resolve()),
        "config_digest": digest,
        "started_at": iso(time.time() - 60),
        "last_seen": iso(time.time() - ago),
    }
    with backend.session() as session:
        session.insert("gateways", [row])


def test_lists_live_gateways_and_whether_they_serve_the_file(
    backend: Backend, state_db: str, config: Path
) -> None:
    digest = load_config(config).digest
    assert run(config, state_db).output.startswith("no live gateway serves")
    assert json.loads(run(config, state_db, "--json").output) == []
    register(backend, config, "gw-a.internal:101:aaaaaa", digest)
    register(backend, config, "gw-b.internal:102:bbbbbb", digest)
    register(backend, config, "gw-c.internal:103:cccccc", "old", ago=60)  # gone silent
    result = run(config, state_db)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "ID", "NODE", "PID", "LISTEN", "CONFIG_DIGEST", "LAST_SEEN", "CURRENT"
    ]  # fmt: skip
    assert len(lines) == 3 and lines[1].startswith("gw-a.internal:101:aaaaaa  gw-a.internal")
    assert "reverse 0.0.0.0:8080" in lines[1] and digest[:12] in lines[1]
    assert lines[1].endswith("yes") and lines[2].endswith("yes")
    [a, b] = json.loads(run(config, state_db, "--json").output)
    assert (a["id"], a["pid"], a["config_digest"], a["current"]) == (
        "gw-a.internal:101:aaaaaa",
        101,
        digest,
        True,
    )
    assert a["listen"] == [{"mode": "reverse", "address": "0.0.0.0:8080"}]
    assert b["node"] == "gw-b.internal"


def test_exit_1_when_live_gateways_serve_different_configs(
    backend: Backend, state_db: str, config: Path
) -> None:
    register(backend, config, "gw-a.internal:101:aaaaaa", load_config(config).digest)
    register(backend, config, "gw-b.internal:102:bbbbbb", "an-older-digest")
    result = run(config, state_db, "--json")
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    assert [g["current"] for g in found] == [True, False]
    assert "the live gateways serve 2 different configs" in result.stderr
