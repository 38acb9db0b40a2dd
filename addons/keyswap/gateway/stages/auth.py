"""Authentication: the proxy credential must be one of the routed proxy's tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http
from mitmproxy.http import Headers

from keyswap.config.tokens import digest
from keyswap.gateway import problem
from keyswap.net import fields

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

TOKEN_ID = "keyswap.token_id"
CHALLENGE = {"www-authenticate": 'Bearer realm="keyswap"'}
INVALID = {"www-authenticate": 'Bearer realm="keyswap", error="invalid_token"'}


def presented_token(headers: Headers) -> str | None:
    """The proxy token a request carries: `x-proxy-token: <t>`, `Authorization: Bearer <t>`
    or `Authorization: <t>`."""
    token = fields.get(headers, b"x-proxy-token")
    if token:
        return token.strip()
    auth = (fields.get(headers, b"authorization") or "").strip()
    scheme, _, rest = auth.partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip()
    return auth or None


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
