"""Authentication: the proxy credential must be one of the routed proxy's tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap import problem
from keyswap.tokens import digest, presented_token

if TYPE_CHECKING:
    from keyswap.settings import Settings

TOKEN_ID = "keyswap.token_id"
CHALLENGE = {"www-authenticate": 'Bearer realm="keyswap"'}
INVALID = {"www-authenticate": 'Bearer realm="keyswap", error="invalid_token"'}


class Authenticate:
    """Refuses requests without a valid token for the proxy their path routes to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.PROXY not in flow.metadata:
            return
        token = presented_token(flow.request.headers)
        if not token:
            problem.deny(
                flow,
                401,
                "missing-token",
                "this proxy needs a token: Authorization: Bearer <token> or x-proxy-token",
                CHALLENGE,
            )
            return
        owner = self.settings.runtime.tokens.get(digest(token))
        if owner is None or owner[0] != flow.metadata[problem.PROXY]:
            problem.deny(flow, 401, "wrong-token", "the token is not valid for this proxy", INVALID)
            return
        flow.metadata[TOKEN_ID] = owner[1]
