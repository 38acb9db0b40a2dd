import pytest
from pydantic import ValidationError

from keyswap.config.model import Config, Proxy, Rule, Target, json_schema, parse_rate_limit


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20/s", (20, 1)), ("600/min", (600, 60)), ("5/m", (5, 60)), ("10000/h", (10000, 3600))],
)
def test_rate_limits(text: str, expected: tuple[int, int]) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["20", "fast", "20/day", "-1/s"])
def test_bad_rate_limits(text: str) -> None:
    with pytest.raises(ValueError, match="must look like 20/s"):
        parse_rate_limit(text)


def proxy(**fields: object) -> Proxy:
    return Proxy.model_validate({"target": "t", **fields})


def test_origins_are_normalised() -> None:
    p = proxy(allowed_origins=["https://app.example.com:443/", "http://LOCALHOST:8000", "*"])
    assert p.allowed_origins == ["https://app.example.com", "http://localhost:8000", "*"]


@pytest.mark.parametrize(
    "origin", ["app.example.com", "https://app.example.com/path", "https://u:p@x.test", "ftp://x"]
)
def test_bad_origins(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin"):
        proxy(allowed_origins=[origin])


def test_routes_lose_trailing_slash_and_methods_are_upper_case() -> None:
    p = proxy(routes=["/api/x/", "/"], methods=["get", "Post"])
    assert p.routes == ["/api/x", "/"]
    assert p.methods == ["GET", "POST"]


@pytest.mark.parametrize("route", ["/_keyswap", "/_keyswap/health", "/_keyswapper"])
def test_reserved_routes(route: str) -> None:
    with pytest.raises(ValidationError, match="keyswap reserves"):
        proxy(routes=[route])


@pytest.mark.parametrize("route", ["/a/../b", "/a/./b", "/a//b", "/a%2fb"])
def test_routes_without_traversal(route: str) -> None:
    with pytest.raises(ValidationError, match="may not contain"):
        proxy(routes=[route])


def test_rule_is_allow_or_deny() -> None:
    assert Rule.model_validate({"deny": {"methods": ["delete"]}}).action == "deny"
    assert Rule.model_validate({"allow": {}}).match.methods is None
    with pytest.raises(ValidationError, match="either"):
        Rule.model_validate({})
    with pytest.raises(ValidationError, match="either"):
        Rule.model_validate({"allow": {}, "deny": {}})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("api.example.com", "is not an http"),
        ("https://u:p@api.example.com", "no query, fragment or user"),
        ("https://api.example.com?x=1", "no query"),
        ("https://api.example.com:99999", "invalid port"),
    ],
)
def test_bad_base_urls(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Target.model_validate({"base_url": url, "credential": "c"})


def test_base_url_keeps_its_path() -> None:
    target = Target.model_validate({"base_url": "https://x.example/v2/", "credential": "c"})
    assert target.base_url == "https://x.example/v2"


def test_oauth2_refresh_grant_needs_a_refresh_token() -> None:
    cred = {
        "type": "oauth2",
        "grant": "refresh_token",
        "token_url": "https://auth.example/token",
        "client_id": "id",
        "client_secret": "s",
    }
    with pytest.raises(ValidationError, match="needs refresh_token"):
        Config.model_validate({"credentials": {"c": cred}})


def test_secrets_never_show_in_repr_or_errors() -> None:
    config = Config.model_validate(
        {"credentials": {"c": {"type": "bearer", "token": "sk_live_hidden"}}}
    )
    assert "sk_live_hidden" not in repr(config)
    with pytest.raises(ValidationError) as e:
        Config.model_validate(
            {"credentials": {"c": {"type": "bearer", "token": "sk_hidden2", "x": 1}}}
        )
    assert "sk_hidden2" not in str(e.value)


def test_default_route_and_serving() -> None:
    config = Config.model_validate(
        {
            "environment": "dev",
            "region": "eu",
            "proxies": {
                "a": {"target": "t"},
                "b": {"target": "t", "environments": ["prod"]},
                "c": {"target": "t", "region": "us"},
            },
        }
    )
    assert config.routes_of("a") == ["/api/a"]
    assert [config.serves(p) for p in "abc"] == [True, False, False]


def test_schema_allows_references_for_numbers() -> None:
    port = json_schema()["$defs"]["UpstreamProxy"]["properties"]["port"]
    assert {"type": "string", "pattern": r"\$\{[^}]+\}"} in port["anyOf"]
