import base64

import pytest
from mitmproxy.http import Headers
from pydantic import SecretStr

from keyswap.config.model import HeaderCredential, QueryCredential
from keyswap.gateway.stages.auth import presented_token


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"authorization": "Bearer ks_a"}, "ks_a"),
        ({"authorization": "bearer  ks_a "}, "ks_a"),
        ({"authorization": "ks_a"}, "ks_a"),
        ({"x-proxy-token": "ks_b", "authorization": "Bearer ks_a"}, "ks_b"),
        ({}, None),
        ({"authorization": ""}, None),
    ],
)
def test_presented_token(headers: dict[str, str], token: str | None) -> None:
    assert presented_token(Headers(**headers)) == token


def test_the_token_where_the_target_credential_goes() -> None:
    header = HeaderCredential(type="header", name="x-api-key", value=SecretStr("real"))
    query = QueryCredential(type="query", name="key", value=SecretStr("real"))
    basic = "Basic " + base64.b64encode(b"any:ks_c").decode()
    assert presented_token(Headers(x_api_key="ks_h"), "", header) == "ks_h"
    assert presented_token(Headers(), "a=1&key=ks_q", query) == "ks_q"
    assert presented_token(Headers(authorization=basic)) == "ks_c"
    # only where this proxy's credential goes, and Authorization first
    assert presented_token(Headers(x_api_key="ks_h"), "key=ks_q") is None
    assert (
        presented_token(Headers(authorization="Bearer ks_a", x_api_key="ks_h"), "", header)
        == "ks_a"
    )
