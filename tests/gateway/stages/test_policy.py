from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from keyswap.config.loader import load_config
from keyswap.config.model import Rule
from keyswap.gateway import problem
from keyswap.gateway.runtime import Runtime
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.policy import Policy, glob_regex, rule_verdict


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/crm/v3/**", "/crm/v3", True),
        ("/crm/v3/**", "/crm/v3/owners/1", True),
        ("/crm/v3/**", "/crm/v30", False),
        ("/crm/*/owners", "/crm/v3/owners", True),
        ("/crm/*/owners", "/crm/v3/x/owners", False),
        ("/files/*.json", "/files/a.json", True),
        ("/x", "/x/", False),
        ("/a.b", "/aXb", False),
    ],
)
def test_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).fullmatch(path)) is matches


RULES = [
    Rule.model_validate({"deny": {"methods": ["DELETE"]}}),
    Rule.model_validate({"allow": {"path": "/crm/v3/**"}}),
    Rule.model_validate({"deny": {}}),
]


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("DELETE", "/crm/v3/x", "deny"),
        ("GET", "/crm/v3/x", "allow"),
        ("GET", "/other", "deny"),
    ],
)
def test_first_matching_rule_wins(method: str, path: str, action: str) -> None:
    rule = rule_verdict(RULES, method, path)
    assert rule is not None and rule.action == action


def test_no_rules_means_allow() -> None:
    assert rule_verdict([], "GET", "/x") is None


def test_a_forward_mode_request_never_leaves_its_tunnels_origin(tmp_path: Path) -> None:
    # The target may reach :8443 by allowed_hosts, but not from a tunnel to :443.
    path = tmp_path / "keyswap.yaml"
    path.write_text(
        """
credentials: { k: { type: bearer, token: some-secret-value } }
targets:
  t: { base_url: "https://api.example", credential: k, allowed_hosts: ["https://api.example:8443"] }
proxies: { p: { target: t } }
"""
    )
    settings = Settings()
    settings.runtime = Runtime.build(load_config(path, {}))

    def forwarded(rest: str) -> http.HTTPFlow:
        flow = tflow.tflow()
        meta = {problem.PROXY: "p", problem.FORWARD: "https://api.example", problem.REST: rest}
        flow.metadata.update(meta)
        Policy(settings).requestheaders(flow)
        return flow

    elsewhere = forwarded("/https://api.example:8443/x")
    assert elsewhere.response is not None and elsewhere.response.status_code == 403
    assert problem.DESTINATION not in elsewhere.metadata
    there = forwarded("/https://api.example/x")
    assert there.response is None and there.metadata[problem.DESTINATION]["port"] == 443
