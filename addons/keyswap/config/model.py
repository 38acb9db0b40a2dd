"""The configuration model: the single description of keyswap's YAML file.

The JSON Schema (`keyswap schema`), `keyswap check` and the README's reference come
from these classes. Values arrive here after `${...}` substitution; secrets are
`SecretStr` so that no repr, log line or error message can show them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

RESERVED_PREFIX = "/_keyswap"
DIGEST = re.compile(r"[0-9a-f]{64}")
_RATE = re.compile(r"(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)")
_RATE_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class Model(BaseModel):
    """Base for every section: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("a port is a number from 1 to 65535")
    return value


def _method(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"'{value}' is not an HTTP method")
    return value.upper()


def _header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"'{value}' is not a valid header name")
    return value.lower()


def _origin(value: str) -> str:
    """An origin is scheme://host[:port], nothing else."""
    if value == "*":
        return value
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(
            f"'{value}' is not an origin; write it as https://host or https://host:port"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"'{value}' has an invalid port") from None
    default = 443 if parts.scheme == "https" else 80
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{value}' is not an http(s) URL; write it as https://host[/base/path]")
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError("base_url carries no query, fragment or user:password (use a credential)")
    try:
        parts.port  # noqa: B018 - evaluated for its validation
    except ValueError:
        raise ValueError(f"'{value}' has an invalid port") from None
    return value.rstrip("/")


def _route(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"route '{value}' must be an absolute path starting with '/'")
    segments = value.split("/")
    if any(s in (".", "..") for s in segments) or "%" in value or "//" in value:
        raise ValueError(f"route '{value}' may not contain '.', '..', '//' or '%' escapes")
    if value.startswith(RESERVED_PREFIX):
        raise ValueError(f"route '{value}' is under {RESERVED_PREFIX}, which keyswap reserves")
    return value.rstrip("/") or "/"


def _rate_limit(value: str) -> str:
    if not _RATE.fullmatch(value.strip()):
        raise ValueError(f"rate_limit '{value}' must look like 20/s, 600/min or 10000/h")
    return value.strip()


def parse_rate_limit(value: str) -> tuple[int, int]:
    """`20/s` -> (20, 1): a count of requests per a number of seconds."""
    m = _RATE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"rate_limit '{value}' must look like 20/s, 600/min or 10000/h")
    return int(m.group(1)), _RATE_SECONDS.get(m.group(2), 3600)


def _digest(value: str) -> str:
    if not DIGEST.fullmatch(value):
        raise ValueError(
            "sha256 must be 64 lowercase hex characters (the digest of the token, "
            "not the token; `keyswap proxies rotate-token` writes it)"
        )
    return value


_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _host_name(value: str) -> str:
    """A host name as a CONNECT names it (`pypi.org`), or all names under a domain
    (`*.pythonhosted.org`); lower case. No scheme, port, path or address pattern."""
    host = value.strip().lower().rstrip(".")
    domain = host[2:] if host.startswith("*.") else None  # at least a name and a TLD
    wild = domain is not None and ("." not in domain or domain.rsplit(".", 1)[1].isdigit())
    if not _HOST_NAME.fullmatch(host) or len(host) > 253 or wild:
        raise ValueError(
            f"'{value}' is not a host name; write it as pypi.org or *.pythonhosted.org "
            "(no scheme, port or path)"
        )
    return host


Port = Annotated[int, AfterValidator(_port)]
Method = Annotated[str, AfterValidator(_method)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
Origin = Annotated[str, AfterValidator(_origin)]
Route = Annotated[str, AfterValidator(_route)]
HostName = Annotated[str, AfterValidator(_host_name)]
Region = Annotated[str, Field(min_length=1, description="the region this resource lives in")]


# --- upstream proxies ------------------------------------------------------------


class NoAuth(Model):
    type: Literal["none"]


class BasicProxyAuth(Model):
    type: Literal["basic"]
    user: str = Field(min_length=1)
    password: SecretStr


class UpstreamProxyTls(Model):
    """TLS to the proxy itself (type https)."""

    verify: bool = True
    ca_file: str | None = None


class UpstreamProxy(Model):
    """A reusable connection through a corporate HTTP or HTTPS proxy."""

    description: str = ""
    type: Literal["http", "https"] = "http"
    host: str = Field(min_length=1)
    port: Port
    auth: Annotated[NoAuth | BasicProxyAuth, Field(discriminator="type")] = NoAuth(type="none")
    tls: UpstreamProxyTls = UpstreamProxyTls()
    region: Region | None = None


# --- target credentials ----------------------------------------------------------


class BearerCredential(Model):
    """`Authorization: Bearer <token>`."""

    type: Literal["bearer"]
    token: SecretStr
    region: Region | None = None


class BasicCredential(Model):
    """`Authorization: Basic base64(username:password)`."""

    type: Literal["basic"]
    username: str
    password: SecretStr
    region: Region | None = None


class HeaderCredential(Model):
    """A header of the target's choosing, e.g. `x-api-key: <value>`."""

    type: Literal["header"]
    name: HeaderName
    value: SecretStr
    region: Region | None = None


class QueryCredential(Model):
    """A query parameter, e.g. `?key=<value>`."""

    type: Literal["query"]
    name: str = Field(min_length=1)
    value: SecretStr
    region: Region | None = None


class OAuth2Credential(Model):
    """An OAuth2 client whose access token keyswap fetches, caches and refreshes."""

    type: Literal["oauth2"]
    grant: Literal["client_credentials", "refresh_token"]
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    refresh_token: SecretStr | None = None
    scope: str | None = None
    audience: str | None = None
    extra: dict[str, str] = Field(default_factory=dict, description="extra token request fields")
    client_auth: Literal["basic", "body"] = "basic"
    refresh_on: list[Annotated[int, Field(ge=400, le=599)]] = Field(default_factory=lambda: [401])
    refresh_skew_s: float = Field(60, ge=0, description="refresh this long before expiry")
    region: Region | None = None

    @model_validator(mode="after")
    def _refresh_grant_needs_token(self) -> OAuth2Credential:
        if self.grant == "refresh_token" and self.refresh_token is None:
            raise ValueError("grant refresh_token needs refresh_token")
        _base_url(self.token_url)
        return self


Credential = Annotated[
    BearerCredential | BasicCredential | HeaderCredential | QueryCredential | OAuth2Credential,
    Field(discriminator="type"),
]


# --- targets ---------------------------------------------------------------------


class TargetTls(Model):
    """How keyswap verifies the target's certificate and proves its own."""

    verify: bool = True
    ca_file: str | None = Field(None, description="PEM bundle of CAs to trust for this target")
    client_cert: str | None = Field(None, description="PEM file with client cert and key")


class Target(Model):
    """The API a proxy forwards to, with the credential it needs."""

    base_url: Annotated[str, AfterValidator(_base_url)]
    credential: str
    upstream_proxy: str | None = None
    allowed_hosts: list[Origin] = Field(default_factory=list)
    timeout_s: float = Field(30, gt=0, description="time allowed for the target's response")
    connect_timeout_s: float = Field(10, gt=0, description="time allowed to connect")
    tls: TargetTls = TargetTls()
    region: Region | None = None


# --- proxies ---------------------------------------------------------------------


class Match(Model):
    """What a rule matches: methods and/or a path glob (`*` one segment, `**` any)."""

    methods: list[Method] | None = None
    path: str | None = None


class Rule(Model):
    """One of `{allow: {...}}` or `{deny: {...}}`; an empty match matches everything."""

    allow: Match | None = None
    deny: Match | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Rule:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("a rule is either {allow: {...}} or {deny: {...}}")
        return self

    @property
    def action(self) -> Literal["allow", "deny"]:
        return "allow" if self.allow is not None else "deny"

    @property
    def match(self) -> Match:
        match = self.allow or self.deny
        assert match is not None
        return match


class HeaderRules(Model):
    strip: list[HeaderName] = Field(default_factory=list)
    set: dict[HeaderName, str] = Field(default_factory=dict)


class Token(Model):
    """A proxy credential, stored as the sha256 hex digest of the token only."""

    id: str = Field(min_length=1)
    sha256: Annotated[str, AfterValidator(_digest)]
    created: datetime | None = None


class AsyncPolicy(Model):
    """How long keyswap keeps trying to deliver a proxy's `Prefer: respond-async`
    requests (docs/async.md)."""

    max_attempts: int = Field(8, ge=1, le=1000, description="then the request is failed")
    max_age_s: float = Field(
        86400,
        gt=0,
        le=10 * 366 * 86400,
        description="seconds after acceptance (at most ten years); then it is expired",
    )


class Proxy(Model):
    """A proxy: routes, rules and tokens in front of one target."""

    name: str = ""
    description: str = ""
    target: str
    active: bool = True
    environments: list[str] | None = Field(None, description="omit: every environment")
    region: Region | None = None
    template: str | None = Field(None, description="informational: created from a template")
    created: datetime | None = None
    routes: list[Route] | None = Field(None, description="default [/api/<id>]")
    methods: list[Method] | None = Field(None, description="default: all")
    rules: list[Rule] = Field(default_factory=list)
    allowed_origins: list[Origin] = Field(default_factory=list)
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    rate_limit: Annotated[str, AfterValidator(_rate_limit)] | None = None
    # `async` is a Python keyword: the field has another name, the YAML key is `async`.
    async_: AsyncPolicy = Field(AsyncPolicy(), alias="async")
    tokens: list[Token] = Field(default_factory=list)


class Limits(Model):
    """What one client may send and hold (DESIGN's defaults): past them a request is
    refused before routing, and never reaches a target."""

    max_url_bytes: int = Field(8192, ge=256, description="longer request target: 414")
    max_header_bytes: int = Field(65536, ge=1024, description="larger request head: 431")
    max_headers: int = Field(100, ge=8, description="more header fields: 431")
    header_timeout_s: float = Field(10, gt=0, description="the request head must arrive within")
    idle_timeout_s: float = Field(60, gt=0, description="an idle client connection is closed")
    max_connections: int = Field(10000, ge=1, description="open client connections at most")
    max_async_body_bytes: int = Field(1048576, ge=0, description="larger async body: 413")


class Forward(Model):
    """Forward (intercepting) mode (docs/forward.md): which hosts, besides the targets'
    origins, a program behind `HTTPS_PROXY` may reach."""

    passthrough: list[HostName] = Field(
        default_factory=list,
        description="tunnelled untouched (no TLS interception, no swap); matched against "
        "the host name the client's CONNECT names, never a resolved address",
    )


ParamValue = str | int | float | bool


class Config(Model):
    """The whole keyswap configuration file."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    version: Literal[1] = 1
    environment: str = Field("dev", min_length=1, description="selects a params set")
    region: Region | None = Field(None, description="this instance serves only this region")
    public_base_url: str | None = Field(None, description="used to print proxy URLs")
    params: dict[str, dict[str, ParamValue]] = Field(default_factory=dict)
    upstream_proxies: dict[str, UpstreamProxy] = Field(default_factory=dict)
    credentials: dict[str, Credential] = Field(default_factory=dict)
    targets: dict[str, Target] = Field(default_factory=dict)
    proxies: dict[str, Proxy] = Field(default_factory=dict)
    limits: Limits = Limits()
    forward: Forward = Forward()

    def routes_of(self, proxy_id: str) -> list[str]:
        """A proxy's routes, with the default `/api/<id>` applied."""
        return self.proxies[proxy_id].routes or [f"/api/{proxy_id}"]

    def serves(self, proxy_id: str) -> bool:
        """Whether this instance (its environment and region) serves the proxy."""
        proxy = self.proxies[proxy_id]
        in_env = proxy.environments is None or self.environment in proxy.environments
        in_region = self.region is None or proxy.region in (None, self.region)
        return in_env and in_region


class _SubstitutableSchema(GenerateJsonSchema):
    """Numbers and booleans may also be written as a `${...}` reference in the file."""

    REFERENCE: ClassVar[JsonSchemaValue] = {"type": "string", "pattern": r"\$\{[^}]+\}"}

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        return {"anyOf": [super().int_schema(schema), self.REFERENCE]}

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        return {"anyOf": [super().float_schema(schema), self.REFERENCE]}

    def bool_schema(self, schema: core_schema.BoolSchema) -> JsonSchemaValue:
        return {"anyOf": [super().bool_schema(schema), self.REFERENCE]}


def json_schema() -> dict[str, object]:
    """The JSON Schema of the file as written (before substitution)."""
    return Config.model_json_schema(schema_generator=_SubstitutableSchema)
