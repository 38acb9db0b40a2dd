import base64
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.http import Headers
from mitmproxy.test import tflow

from keyswap.config.loader import load_config
from keyswap.config.tokens import digest, new_token
from keyswap.gateway import problem
from keyswap.gateway.runtime import NO_PLACES, Runtime, TokenPlaces
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.auth import TOKEN_ID, Authenticate, presented_token

HEADER = TokenPlaces(header=b"x-api-key")
QUERY = TokenPlaces(query="key=")


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"authorization": "Bearer ks_a"}, "ks_a"),
        ({"authorization": "bearer  ks_a "}, "ks_a"),
        ({"authorization": "ks_a"}, "ks_a"),
        ({"authorization": "Token ks_a"}, "ks_a"),  # a scheme an API names for its key
        ({"x-proxy-token": "ks_b", "authorization": "Bearer ks_a"}, "ks_b"),
        ({"authorization": basic("any:ks_c")}, "ks_c"),  # the password (Twilio, Mailgun)
        ({"authorization": basic("ks_c:")}, "ks_c"),  # the user name (`curl -u key:`)
        ({"authorization": basic("ks_c")}, "ks_c"),
        ({"authorization": "Basic !!"}, "Basic !!"),  # not base64: checked, and wrong
        ({"authorization": basic(":")}, basic(":")),
        ({}, None),
        ({"authorization": ""}, None),
        ({"authorization": "  "}, None),
    ],
)
def test_presented_token(headers: dict[str, str], token: str | None) -> None:
    assert presented_token(Headers(**headers)) == token


def test_the_token_where_the_target_credential_goes() -> None:
    assert presented_token(Headers(x_api_key=" ks_h "), "/x", HEADER) == "ks_h"
    assert presented_token(Headers(), "/x?a=1&key=ks_q&key=2", QUERY) == "ks_q"
    assert presented_token(Headers(), "/x?key=ks%5Fq", QUERY) == "ks%5Fq"  # as written
    # only where this proxy's credential goes ...
    assert presented_token(Headers(x_api_key="ks_h"), "/x?key=ks_q") is None
    assert presented_token(Headers(x_api_key="ks_h"), "/x", QUERY) is None
    assert presented_token(Headers(), "/x?key=ks_q", HEADER) is None
    # ... as written (the swap replaces the parameter by the name as written) ...
    assert presented_token(Headers(), "/x?%6Bey=ks_q&mykey=ks_r", QUERY) is None
    assert presented_token(Headers(), "/x?key", QUERY) is None
    # ... and Authorization first
    both = Headers(authorization="Bearer ks_a", x_api_key="ks_h")
    assert presented_token(both, "/x?key=ks_q", HEADER) == "ks_a"


CONFIG = """\
version: 1
credentials:
  bearer: {{ type: bearer, token: real-bearer }}
  basic: {{ type: basic, username: u, password: real-basic }}
  header: {{ type: header, name: X-Goog-Api-Key, value: real-header }}
  query: {{ type: query, name: api key, value: real-query }}
  auth: {{ type: header, name: authorization, value: Token real }}
targets:
  bearer: {{ base_url: "https://b.example", credential: bearer }}
  basic: {{ base_url: "https://b.example", credential: basic }}
  header: {{ base_url: "https://h.example", credential: header }}
  query: {{ base_url: "https://q.example", credential: query }}
  auth: {{ base_url: "https://a.example", credential: auth }}
proxies:
  bearer: {{ target: bearer, tokens: [{{ id: one, sha256: {bearer} }}] }}
  basic: {{ target: basic }}
  header: {{ target: header, tokens: [{{ id: two, sha256: {header} }}] }}
  query: {{ target: query, tokens: [{{ id: three, sha256: {query} }}] }}
  auth: {{ target: auth }}
"""


@pytest.fixture
def tokens() -> dict[str, str]:
    return {name: new_token() for name in ("bearer", "header", "query")}


@pytest.fixture
def settings(tmp_path: Path, tokens: dict[str, str]) -> Settings:
    path = tmp_path / "keyswap.yaml"
    path.write_text(CONFIG.format(**{k: digest(v) for k, v in tokens.items()}))
    settings = Settings()
    settings.runtime = Runtime.build(load_config(path, {}))
    return settings


def test_the_places_are_worked_out_once_per_config(settings: Settings) -> None:
    assert settings.runtime.token_places == {
        "bearer": NO_PLACES,
        "basic": NO_PLACES,
        "header": TokenPlaces(header=b"x-goog-api-key"),
        "query": TokenPlaces(query="api%20key="),
        "auth": NO_PLACES,  # Authorization is always looked at
    }


def authenticate(settings: Settings, proxy: str, path: str, **headers: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = path
    flow.request.headers = Headers(**headers)
    flow.metadata[problem.PROXY] = proxy
    Authenticate(settings).requestheaders(flow)
    return flow


def test_a_token_where_the_credential_goes_is_accepted(
    settings: Settings, tokens: dict[str, str]
) -> None:
    flow = authenticate(settings, "header", "/x", x_goog_api_key=tokens["header"])
    assert flow.response is None and flow.metadata[TOKEN_ID] == "two"
    flow = authenticate(settings, "query", f"/x?api%20key={tokens['query']}")
    assert flow.response is None and flow.metadata[TOKEN_ID] == "three"
    flow = authenticate(settings, "bearer", "/x", authorization=basic(f"{tokens['bearer']}:"))
    assert flow.response is None and flow.metadata[TOKEN_ID] == "one"


@pytest.mark.parametrize(
    ("proxy", "path", "headers", "reason"),
    [
        ("bearer", "/x", {}, "missing-token"),
        ("bearer", "/x", {"x_api_key": "{header}"}, "missing-token"),  # not its place
        ("bearer", "/x?key={bearer}", {}, "missing-token"),
        ("header", "/x", {"authorization": "Bearer {bearer}"}, "wrong-token"),  # another's
        ("header", "/x", {"authorization": "Bearer ks_short"}, "wrong-token"),
        ("query", "/x?api+key={query}", {}, "missing-token"),  # not as the swap writes it
        ("query", "/x?api%20key=ks%5F{query_rest}", {}, "wrong-token"),  # encoded: not shaped
    ],
)
def test_refusals(
    settings: Settings,
    tokens: dict[str, str],
    proxy: str,
    path: str,
    headers: dict[str, str],
    reason: str,
) -> None:
    values = {**tokens, "query_rest": tokens["query"][3:]}
    filled = {k: v.format(**values) for k, v in headers.items()}
    flow = authenticate(settings, proxy, path.format(**values), **filled)
    assert flow.response is not None and flow.response.status_code == 401
    assert flow.response.json()["error"]["code"] == reason
    assert flow.response.headers["www-authenticate"].startswith('Bearer realm="keyswap"')
    assert TOKEN_ID not in flow.metadata


def test_only_a_value_shaped_like_a_token_is_one(tmp_path: Path) -> None:
    """Every place that keeps a token from the target and the log knows it by its shape,
    so a digest of something else in the config never lets that value through."""
    path = tmp_path / "keyswap.yaml"
    path.write_text(
        CONFIG.format(bearer=digest("hunter2-not-a-token"), header="a" * 64, query="b" * 64)
    )
    settings = Settings()
    settings.runtime = Runtime.build(load_config(path, {}))
    flow = authenticate(settings, "bearer", "/x", authorization="Bearer hunter2-not-a-token")
    assert flow.response is not None and flow.response.status_code == 401
