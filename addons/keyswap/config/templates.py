"""Built-in templates: a proxy for a well-known API in one command. Each names the base
URL, how the credential is placed, sensible default rules and header settings, and the
API's documentation; secrets are `${env:...}` references, never values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Template:
    """What `keyswap proxies create ID --template NAME` writes."""

    name: str
    title: str
    base_url: str
    credential: dict[str, Any]
    docs: str
    methods: list[str] | None = None
    rules: list[dict[str, Any]] = field(default_factory=list)
    request_headers: dict[str, Any] = field(default_factory=dict)
    response_headers: dict[str, Any] = field(default_factory=dict)
    rate_limit: str | None = None

    @property
    def env_vars(self) -> list[str]:
        """The environment variables the credential reads."""
        return [name for v in self.credential.values() if (name := _env_name(v))]

    @property
    def key_env_var(self) -> str | None:
        """The variable that holds the key a program sends, where a program made for this
        API looks for it (OPENAI_API_KEY): the bearer token, the header's or query
        parameter's value, basic's password. None for OAuth2: a program holds no key."""
        secret = {"bearer": "token", "header": "value", "query": "value", "basic": "password"}
        field_name = secret.get(str(self.credential["type"]))
        return _env_name(self.credential[field_name]) if field_name else None

    @property
    def placement(self) -> str:
        kind = str(self.credential["type"])
        if kind in ("header", "query"):
            return f"{kind} {self.credential['name']}"
        return {"bearer": "Authorization: Bearer", "basic": "Authorization: Basic"}.get(kind, kind)


def _env_name(value: object) -> str | None:
    """NAME, of a `${env:NAME}` reference."""
    if isinstance(value, str) and value.startswith("${env:") and value.endswith("}"):
        return value[6:-1]
    return None


def _env(prefix: str, name: str) -> str:
    return "${env:" + f"{prefix}_{name}" + "}"


def _oauth2(prefix: str, token_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "oauth2",
        "grant": "refresh_token",
        "token_url": token_url,
        "client_id": _env(prefix, "CLIENT_ID"),
        "client_secret": _env(prefix, "CLIENT_SECRET"),
        "refresh_token": _env(prefix, "REFRESH_TOKEN"),
        **extra,
    }


_NO_HOPS = {"strip": ["cookie"]}

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            "openai",
            "OpenAI API",
            "https://api.openai.com/v1",
            {"type": "bearer", "token": _env("OPENAI", "API_KEY")},
            "https://platform.openai.com/docs/api-reference",
            methods=["GET", "POST", "DELETE"],
            request_headers=_NO_HOPS,
            rate_limit="20/s",
        ),
        Template(
            "anthropic",
            "Anthropic API",
            "https://api.anthropic.com",
            {"type": "header", "name": "x-api-key", "value": _env("ANTHROPIC", "API_KEY")},
            "https://docs.anthropic.com/en/api",
            methods=["GET", "POST"],
            rules=[{"allow": {"path": "/v1/**"}}, {"deny": {}}],
            request_headers={"strip": ["cookie"], "set": {"anthropic-version": "2023-06-01"}},
            rate_limit="20/s",
        ),
        Template(
            "stripe",
            "Stripe API",
            "https://api.stripe.com",
            {"type": "bearer", "token": _env("STRIPE", "SECRET_KEY")},
            "https://docs.stripe.com/api",
            methods=["GET", "POST", "DELETE"],
            rules=[{"allow": {"path": "/v1/**"}}, {"deny": {}}],
            request_headers=_NO_HOPS,
            rate_limit="25/s",
        ),
        Template(
            "github",
            "GitHub REST API",
            "https://api.github.com",
            {"type": "bearer", "token": _env("GITHUB", "TOKEN")},
            "https://docs.github.com/en/rest",
            request_headers={
                "strip": ["cookie"],
                "set": {
                    "accept": "application/vnd.github+json",
                    "x-github-api-version": "2022-11-28",
                },
            },
            rate_limit="10/s",
        ),
        Template(
            "hubspot",
            "HubSpot CRM (OAuth2)",
            "https://api.hubapi.com",
            _oauth2("HUBSPOT", "https://api.hubapi.com/oauth/v1/token"),
            "https://developers.hubspot.com/docs/api/overview",
            methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            rules=[{"allow": {"path": "/crm/**"}}, {"deny": {}}],
            request_headers=_NO_HOPS,
            rate_limit="10/s",
        ),
        Template(
            "slack",
            "Slack Web API",
            "https://slack.com/api",
            {"type": "bearer", "token": _env("SLACK", "BOT_TOKEN")},
            "https://api.slack.com/web",
            methods=["GET", "POST"],
            request_headers=_NO_HOPS,
            rate_limit="1/s",
        ),
        Template(
            "twilio",
            "Twilio REST API",
            "https://api.twilio.com/2010-04-01",
            {
                "type": "basic",
                "username": _env("TWILIO", "ACCOUNT_SID"),
                "password": _env("TWILIO", "AUTH_TOKEN"),
            },
            "https://www.twilio.com/docs/usage/api",
            methods=["GET", "POST", "DELETE"],
            request_headers=_NO_HOPS,
            rate_limit="10/s",
        ),
        Template(
            "sendgrid",
            "SendGrid Mail API",
            "https://api.sendgrid.com/v3",
            {"type": "bearer", "token": _env("SENDGRID", "API_KEY")},
            "https://www.twilio.com/docs/sendgrid/api-reference",
            methods=["GET", "POST"],
            rules=[
                {"allow": {"path": "/mail/send"}},
                {"allow": {"methods": ["GET"]}},
                {"deny": {}},
            ],
            request_headers=_NO_HOPS,
            rate_limit="10/s",
        ),
        Template(
            "google",
            "Google APIs (OAuth2)",
            "https://www.googleapis.com",
            _oauth2("GOOGLE", "https://oauth2.googleapis.com/token", client_auth="body"),
            "https://developers.google.com/apis-explorer",
            request_headers=_NO_HOPS,
            rate_limit="10/s",
        ),
    ]
}
