import json

import pytest
from click.testing import CliRunner

from keyswap.cli.main import main
from tests.support import ROOT


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
