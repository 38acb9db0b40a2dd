"""What the built-in templates say about the programs that call their APIs."""

import pytest

from keyswap.config.templates import TEMPLATES


@pytest.mark.parametrize(
    ("name", "variable"),
    [
        ("openai", "OPENAI_API_KEY"),  # bearer
        ("anthropic", "ANTHROPIC_API_KEY"),  # a header
        ("github", "GITHUB_TOKEN"),
        ("twilio", "TWILIO_AUTH_TOKEN"),  # basic: the password, not the account SID
        ("hubspot", None),  # OAuth2: a program holds no key
        ("google", None),
    ],
)
def test_the_variable_a_program_reads_its_key_from(name: str, variable: str | None) -> None:
    assert TEMPLATES[name].key_env_var == variable


def test_every_template_reads_its_secrets_from_the_environment() -> None:
    for template in TEMPLATES.values():
        assert template.env_vars, template.name
        assert template.key_env_var in (None, *template.env_vars), template.name
