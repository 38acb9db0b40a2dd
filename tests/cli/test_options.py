"""What the commands share: one --json convention (docs/operations.md, "JSON output"),
tables, and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from keyswap.cli import options
from keyswap.cli.main import main
from keyswap.state.store import audit_row, now_iso
from tests.cli.test_main import commands
from tests.support import ROOT
from tests.support.activity import sqlite_log

# Every command that shows data (DESIGN.md §6), and whether its document is a list.
DATA_COMMANDS = {
    "check": False,
    "proxies list": True,
    "proxies show": False,
    "templates list": True,
    "upstreams list": True,
    "test": False,
    "test-upstream": False,
    "code": False,
    "export": False,
    "curl": False,
    "logs": True,
    "audit": True,
    "stats": True,
    "gateways": True,
    "db upgrade": False,
}


def test_every_data_command_takes_the_one_json_option() -> None:
    shared = options.json_option(click.command()(lambda as_json: None)).params[0]
    found = {}
    for name, cmd in commands(main):
        json_params = [p for p in cmd.params if "--json" in getattr(p, "opts", [])]
        if json_params:
            found[name] = json_params[0]
    assert set(DATA_COMMANDS) <= set(found), set(DATA_COMMANDS) - set(found)
    for name, param in found.items():
        assert isinstance(param, click.Option) and param.help == shared.help, name


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "keyswap.yaml"
    shutil.copy(ROOT / "config" / "keyswap.yaml", path)
    db = sqlite_log(tmp_path / "keyswap.db")
    db["requests"].insert(
        {
            "id": "r1",
            "started_at": "2099-01-01T00:00:00.000Z",
            "proxy_id": "billing",
            "method": "GET",
            "path": "/api/billing/v1/x",
            "target_url": "https://api.stripe.com/v1/x",
            "status": 200,
            "proxy_code": "proxy-access-granted",
            "duration_ms": 12.5,
            "request_headers": json.dumps({"authorization": "********"}),
            "response_headers": json.dumps({"content-type": "application/json"}),
        }
    )
    db["audit"].insert(audit_row("edit", "billing", {"set": {"rate_limit": "5/s"}}))
    db["gateways"].insert(
        {
            "id": f"{socket.gethostname()}:{os.getpid()}:abcdef",
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "listen": json.dumps([{"mode": "reverse", "address": "127.0.0.1:8080"}]),
            "config": str(path.resolve()),
            "config_digest": "d",
            "last_seen": now_iso(),
        }
    )
    db.close()
    return path


INVOCATIONS = {
    "check": ["check"],
    "proxies list": ["proxies", "list"],
    "proxies show": ["proxies", "show", "crm-prod"],
    "templates list": ["templates", "list"],
    "upstreams list": ["upstreams", "list"],
    "code": ["code", "billing", "--lang", "python"],
    "export": ["export", "billing", "--out", "{tmp}/out"],
    "curl": ["curl", "r1"],
    "logs": ["logs"],
    "audit": ["audit"],
    "stats": ["stats"],
    "gateways": ["gateways"],
    "db upgrade": ["db", "upgrade"],
}


def json_text_inside(value: object) -> list[str]:
    """Strings in a document that are themselves JSON objects or arrays."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_text_inside(v)]
    if isinstance(value, list):
        return [s for v in value for s in json_text_inside(v)]
    if isinstance(value, str) and value[:1] in "{[":
        try:
            json.loads(value)
        except ValueError:
            return []
        return [value]
    return []


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_json_is_one_document_with_documents_inside(name: str, config: Path) -> None:
    args = [a.replace("{tmp}", str(config.parent)) for a in INVOCATIONS[name]]
    args += [] if name == "templates list" else ["--config", str(config)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # the whole output is one document
    assert isinstance(document, list if DATA_COMMANDS[name] else dict)
    assert document, "an empty document shows nothing"
    assert json_text_inside(document) == []


def test_json_lines_and_times() -> None:
    runner = CliRunner()

    @click.command()
    def show() -> None:
        options.print_json({"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "p": Path("/x")})
        options.print_json([1, {"a": "é"}], line=True)

    lines = runner.invoke(show).stdout.splitlines()
    assert json.loads("\n".join(lines[:-1])) == {"at": "2026-01-02T03:04:05Z", "p": "/x"}
    assert lines[-1] == '[1, {"a": "é"}]'


def test_a_table_printed_in_parts_stays_aligned() -> None:
    widths: dict[str, int] = {}
    first = options.table([{"a": "x", "b": "1"}], ["a", "b"], widths=widths)
    later = options.table([{"a": "y", "b": "2"}], ["a", "b"], widths=widths, header=False)
    assert first.splitlines() == ["A  B", "x  1"] and later == "y  2"
    assert options.table([{"a": {"k": [1]}, "b": None}], ["a", "b"]).splitlines()[1] == (
        '{"k": [1]}'
    )


def test_ctrl_c_ends_any_command_without_aborted(monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[bool] = []

    def end() -> None:
        ended.append(True)
        raise SystemExit(130)

    monkeypatch.setattr(options, "end_on_interrupt", end)

    @click.group(cls=options.Commands)
    def group() -> None:
        pass

    @group.command()
    def slow() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(group, ["slow"])
    assert ended and result.exit_code == 130 and "Aborted" not in result.output


def test_a_failed_result_is_still_one_document(tmp_path: Path) -> None:
    broken = ROOT / "tests" / "broken" / "dangling-refs.yaml"
    result = CliRunner().invoke(main, ["check", "--config", str(broken), "--json"])
    assert result.exit_code == 1 and "is invalid (3 errors)" in result.stderr
    document = json.loads(result.stdout)
    assert document["valid"] is False
    assert [e["path"] for e in document["errors"]] == [
        "targets.api.credential",
        "targets.api.upstream_proxy",
        "proxies.p.target",
    ]
    assert {"file", "line", "message"} <= set(document["errors"][0])
    reference = str(ROOT / "config" / "keyswap.yaml")
    unknown = CliRunner().invoke(main, ["proxies", "show", "nope", "--json", "--config", reference])
    assert unknown.exit_code == 1 and "nope" in unknown.stderr
    assert unknown.stdout == ""  # no result: nothing on stdout


def test_proxies_show_json_has_token_ids_never_digests(config: Path) -> None:
    result = CliRunner().invoke(
        main, ["proxies", "show", "crm-prod", "--json", "--config", str(config)]
    )
    shown = json.loads(result.stdout)
    assert shown["tokens"] == [{"id": "web", "created": "2026-11-21T10:00:00Z"}]
    assert shown["urls"][0] == "https://eu.gw.example.com/api/crm-prod"
    assert "sha256" not in result.stdout and "3bed53eb" not in result.stdout
