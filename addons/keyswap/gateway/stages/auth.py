"""Authentication: the proxy credential must be one of the routed proxy's tokens."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from mitmproxy import http
from mitmproxy.http import Headers

from keyswap.config.model import Credential, HeaderCredential, QueryCredential
from keyswap.config.tokens import digest
from keyswap.gateway import problem
from keyswap.net import fields

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

TOKEN_ID = "keyswap.token_id"
CHALLENGE = {"www-authenticate": 'Bearer realm="keyswap"'}
INVALID = {"www-authenticate": 'Bearer realm="keyswap", error="invalid_token"'}


def presented_token(
    headers: Headers, query: str = "", credential: Credential | None = None
) -> str | None:
    """The proxy token a request carries: `x-proxy-token: <t>`, `Authorization: Bearer
    <t>`, `Authorization: <t>`, the password of `Authorization: Basic`, or, so that an
    unmodified SDK given the token as its API key works, wherever the proxy's target
    credential goes (its header, its query parameter)."""
    token = fields.get(headers, b"x-proxy-token")
    if token:
        return token.strip()
    auth = (fields.get(headers, b"authorization") or "").strip()
    scheme, _, rest = auth.partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip()
    if rest and scheme.lower() == "basic":
        try:
            return base64.b64decode(rest.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return auth
    if auth:
        return auth
    if isinstance(credential, HeaderCredential):
        value = fields.get(headers, credential.name.lower().encode())
        return value.strip() if value else None
    if isinstance(credential, QueryCredential) and query:
        values = parse_qs(query, keep_blank_values=True).get(credential.name)
        return values[0] if values else None
    return None


class Authenticate:
    """Refuses requests without a valid token for the proxy their path routes to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.PROXY not in flow.metadata:
            return
        config = self.settings.runtime.config
        proxy = config.proxies[flow.metadata[problem.PROXY]]
        credential = config.credentials.get(config.targets[proxy.target].credential)
        query = flow.request.path.partition("?")[2]  # as sent: the rewrite comes later
        token = presented_token(flow.request.headers, query, credential)
        if not token:
            problem.deny(
                flow,
                401,
                "missing-token",
                "this proxy needs a token: Authorization: Bearer <token>, x-proxy-token, or "
                "where the API expects its key",
                CHALLENGE,
            )
            return
        owner = self.settings.runtime.tokens.get(digest(token))
        if owner is None or owner[0] != flow.metadata[problem.PROXY]:
            problem.deny(flow, 401, "wrong-token", "the token is not valid for this proxy", INVALID)
            return
        flow.metadata[TOKEN_ID] = owner[1]
