import pytest
from mitmproxy.http import Headers

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
