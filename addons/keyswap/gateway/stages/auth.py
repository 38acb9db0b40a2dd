"""Authentication: the proxy credential must be one of the routed proxy's tokens."""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, NamedTuple

from mitmproxy import http
from mitmproxy.http import Headers

from keyswap.config.tokens import SHAPE, digest
from keyswap.gateway import delivery, problem
from keyswap.gateway.runtime import NO_PLACES, Runtime, TokenPlaces
from keyswap.net import fields

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

TOKEN_ID = "keyswap.token_id"
TOKEN_SHA256 = "keyswap.token_sha256"  # the token's digest, as the config holds it
CHALLENGE = {"www-authenticate": 'Bearer realm="keyswap"'}
INVALID = {"www-authenticate": 'Bearer realm="keyswap", error="invalid_token"'}
MISSING = (
    "this proxy needs a token: Authorization: Bearer <token>, x-proxy-token, or where the API "
    "expects its key"
)


def presented_token(
    headers: Headers, path: str = "", places: TokenPlaces = NO_PLACES
) -> str | None:
    """The proxy token a request carries, looked for in this order: `x-proxy-token: <t>`;
    `Authorization: Bearer <t>` (or another scheme), `Authorization: <t>`, or
    `Authorization: Basic` with the token as the password (or as the user name when the
    password is empty); then, so that an unmodified SDK given the token as its API key
    works, where the proxy's target credential goes (`places`: its header, or its query
    parameter in `path`). The first place found is the one checked."""
    token = fields.get(headers, b"x-proxy-token")
    if token:
        return token.strip()
    auth = fields.get(headers, b"authorization")
    if auth and (auth := auth.strip()):
        scheme, _, rest = auth.partition(" ")
        if not rest:
            return auth
        if scheme.lower() == "basic":
            return _basic(rest.strip()) or auth
        return rest.strip()  # Bearer, or the scheme an API names for its key (Token, Bot)
    if places.header is not None:
        value = fields.get(headers, places.header)
        if value:
            return value.strip()
    if places.query is not None:
        return _parameter(path, places.query)
    return None


class Owner(NamedTuple):
    """Whose a valid token is: its proxy, its id there, and its digest."""

    proxy_id: str
    token_id: str
    sha256: str


def owner_of(runtime: Runtime, token: str) -> Owner | None:
    """The owner of a presented token, or None. Only a value shaped like a token can be
    one: every place that keeps a token from the target, the log and the stored flow
    recognises it by that shape."""
    if not SHAPE.fullmatch(token):
        return None
    sha256 = digest(token)
    found = runtime.tokens.get(sha256)
    return Owner(found[0], found[1], sha256) if found else None


def _basic(credentials: str) -> str | None:
    """The token in `Basic base64(user:password)`: the password (Twilio, Mailgun style),
    or the user name when the password is empty (Stripe's `-u <key>:`)."""
    try:
        pair = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = pair.partition(":")
    return password or user


def _parameter(path: str, prefix: str) -> str | None:
    """The value of the first query parameter written `prefix<value>` (`key=`), as
    written: a token's characters need no percent-encoding, and what is masked or
    dropped as token-shaped is the text as written, so an encoded one is never taken.
    The name is matched as written too, as the swap that replaces it matches it."""
    query = path.partition("?")[2]
    if prefix not in query:
        return None
    for part in query.split("&"):
        if part.startswith(prefix):
            return part[len(prefix) :]
    return None


class Authenticate:
    """Refuses requests without a valid token for the proxy their path routes to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.PROXY not in flow.metadata:
            return
        if problem.FORWARD in flow.metadata:
            return  # authenticated by the forward router, where the proxy was picked
        runtime = self.settings.runtime
        proxy_id = flow.metadata[problem.PROXY]
        if (attempt := delivery.attempt_of(flow)) is not None:
            # An async request's delivery: authenticated when it was accepted, by the
            # token it names; its path must still route to that token's proxy.
            job = attempt.job
            if job.proxy_id != proxy_id:
                message = f"the path now routes to proxy '{proxy_id}', not the one that accepted it"
                problem.deny(flow, 403, "async-proxy-changed", message)
                return
            # Still one of the proxy's tokens: rotating or deleting a (leaked) token also
            # stops what it queued.
            if runtime.tokens.get(job.token_sha256 or "") != (proxy_id, job.token_id):
                message = "the token that sent this request was rotated or deleted since"
                problem.deny(flow, 401, "token-revoked", message)
                return
            flow.metadata[TOKEN_ID] = job.token_id
            return
        places = runtime.token_places.get(proxy_id, NO_PLACES)
        # The path as sent (the rewrite comes later), read only by a proxy whose token
        # may stand in a query parameter.
        path = flow.request.path if places.query is not None else ""
        token = presented_token(flow.request.headers, path, places)
        if not token:
            problem.deny(flow, 401, "missing-token", MISSING, CHALLENGE)
            return
        owner = owner_of(runtime, token)
        if owner is None or owner.proxy_id != proxy_id:
            problem.deny(flow, 401, "wrong-token", "the token is not valid for this proxy", INVALID)
            return
        flow.metadata[TOKEN_ID] = owner.token_id
        flow.metadata[TOKEN_SHA256] = owner.sha256
