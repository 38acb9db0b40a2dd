import re

from keyswap.config.tokens import digest, new_token


def test_new_tokens_have_the_documented_shape() -> None:
    token = new_token()
    assert re.fullmatch(r"ks_[A-Za-z0-9_-]{43}", token)
    assert new_token() != token
    assert re.fullmatch(r"[0-9a-f]{64}", digest(token))
