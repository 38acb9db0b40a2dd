import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from keyswap.cli.config import schema_json
from keyswap.cli.main import main
from tests.support import ROOT

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


def test_check_names_unused_targets_credentials_and_upstream_proxies(write_config) -> None:
    path = write_config(
        "upstream_proxies:\n  corp: { host: proxy.example, port: 3128 }\n"
        "credentials:\n  k: { type: bearer, token: '${env:HOME}' }\n"
        "targets:\n  t: { base_url: 'https://x.example', credential: k, upstream_proxy: corp }\n"
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}:6: targets.t: no proxy uses this target\n" in result.output
    assert f"warning: {path}:4: credentials.k: used only by unused target 't'\n" in result.output
    assert (
        f"warning: {path}:2: upstream_proxies.corp: used only by unused target 't'\n"
        in result.output
    )
