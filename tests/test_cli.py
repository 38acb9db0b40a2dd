import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from keyswap.cli import main, schema_json

from .conftest import ROOT

BROKEN = sorted((ROOT / "tests" / "broken").glob("*.yaml"))
EXAMPLES = sorted(p for p in (ROOT / "config").glob("*.yaml") if p.name != "datasette.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_checks(path: Path) -> None:
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert ": OK (environment" in result.output


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_name_the_schema(path: Path) -> None:
    assert path.read_text().startswith("# yaml-language-server: $schema=keyswap.schema.json")


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.name)
def test_broken_configs_fail_with_every_expected_message(path: Path) -> None:
    expected = re.findall(r"^# expect: (.*)$", path.read_text(), re.M)
    assert expected, f"{path.name} names no expected message"
    result = CliRunner().invoke(main, ["check", "--config", str(path)], env={"HOME": "/root"})
    assert result.exit_code == 1
    for message in expected:
        assert message in result.output


def test_check_summary_lists_proxies(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check", "--config", str(ROOT / "config" / "keyswap.yaml")])
    assert "crm-prod: /api/crm-prod, /connections/hubspot/proxy -> hubspot" in result.output
    assert "[not served here]" in result.output


def test_warnings_do_not_change_the_exit_code(write_config) -> None:
    path = write_config(
        "credentials:\n  k: { type: bearer, token: sk_live_literal }\n"
        "targets:\n  t: { base_url: 'https://x.example', credential: k }\n"
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0
    assert "warning: " in result.output and "a secret is written in the file" in result.output
    assert "sk_live_literal" not in result.output


def test_config_defaults_to_env(write_config, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config("version: 1\n")
    monkeypatch.setenv("KEYSWAP_CONFIG", str(path))
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0 and str(path) in result.output


def test_schema_file_matches_the_model() -> None:
    committed = (ROOT / "config" / "keyswap.schema.json").read_text().strip()
    assert committed == schema_json(), "run: keyswap schema > config/keyswap.schema.json"


def commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out += commands(cmd, f"{prefix}{name} ")
    return out


@pytest.mark.parametrize(
    ("name", "cmd"), commands(main), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_command_has_help_with_an_example(name: str, cmd: click.Command) -> None:
    assert cmd.help and "Example:" in cmd.help and f"keyswap {name}" in cmd.help


def test_upstreams_list_resolves_params_per_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = str(ROOT / "config" / "keyswap.yaml")
    dev = CliRunner().invoke(main, ["upstreams", "list", "--config", config])
    assert dev.exit_code == 0, dev.output
    assert "corporate  http  127.0.0.1:3128  basic  hubspot" in dev.output
    monkeypatch.setenv("KEYSWAP_ENV", "prod")
    prod = CliRunner().invoke(main, ["upstreams", "list", "--config", config, "--json"])
    assert json.loads(prod.output)[0]["address"] == "proxy.corp.example.com:8443"
    assert json.loads(prod.output)[0]["auth"] == "basic" and "password" not in prod.output


def test_test_upstream_needs_a_known_proxy() -> None:
    config = str(ROOT / "config" / "keyswap.yaml")
    result = CliRunner().invoke(main, ["test-upstream", "nope", "--config", config])
    assert result.exit_code == 1 and "no upstream proxy 'nope' (known: corporate)" in result.output
