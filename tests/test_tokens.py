import re

import pytest
from mitmproxy.http import Headers

from keyswap.tokens import digest, new_token, presented_token


def test_new_tokens_have_the_documented_shape() -> None:
    token = new_token()
    assert re.fullmatch(r"ks_[A-Za-z0-9_-]{43}", token)
    assert new_token() != token
    assert re.fullmatch(r"[0-9a-f]{64}", digest(token))


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
