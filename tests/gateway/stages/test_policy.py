import pytest

from keyswap.config.model import Rule
from keyswap.gateway.stages.policy import glob_regex, rule_verdict


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
