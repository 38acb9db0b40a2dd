"""The credential swap: the target credential goes on the request at the last step,
and comes off the stored flow as soon as the flow completes."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap.config.model import (
    BasicCredential,
    BearerCredential,
    HeaderCredential,
    OAuth2Credential,
    QueryCredential,
)
from keyswap.config.secrets import MASK
from keyswap.config.tokens import SHAPE_BYTES as TOKEN_SHAPE
from keyswap.config.tokens import TOKEN_HEADERS
from keyswap.gateway import problem
from keyswap.net import fields
from keyswap.net.urls import with_query_param

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

MASK_BYTES = MASK.encode()
ALWAYS_MASKED = frozenset({b"proxy-authorization", *(n.encode() for n in TOKEN_HEADERS)})


class CredentialSwap:
    """Puts the target credential on granted requests; masks it once the flow is done."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.carrying: set[http.HTTPFlow] = set()  # flows with a credential, not yet masked

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.DESTINATION not in flow.metadata:
            return
        config = self.settings.runtime.config
        target = config.targets[flow.metadata[problem.TARGET]]
        credential = config.credentials[target.credential]
        request = flow.request
        self.carrying.add(flow)
        match credential:
            case BearerCredential(token=token):
                secret = f"Bearer {token.get_secret_value()}".encode("utf-8", "surrogateescape")
                fields.put(request.headers, b"authorization", secret)
                flow.metadata[problem.SECRET_HEADER] = "authorization"
            case BasicCredential(username=user, password=password):
                pair = f"{user}:{password.get_secret_value()}".encode("utf-8", "surrogateescape")
                fields.put(request.headers, b"authorization", b"Basic " + base64.b64encode(pair))
                flow.metadata[problem.SECRET_HEADER] = "authorization"
            case HeaderCredential(name=name, value=value):
                secret = value.get_secret_value().encode("utf-8", "surrogateescape")
                fields.put(request.headers, name.lower().encode(), secret)
                flow.metadata[problem.SECRET_HEADER] = name
            case QueryCredential(name=name, value=value):
                request.path = with_query_param(request.path, name, value.get_secret_value())
                flow.metadata[problem.SECRET_QUERY] = name
            case OAuth2Credential():
                pass  # the OAuth2 addon fetches and applies it

    def response(self, flow: http.HTTPFlow) -> None:
        self.carrying.discard(flow)
        mask(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.carrying.discard(flow)
        mask(flow)

    def done(self) -> None:
        # Before mitmproxy's Save addon writes the flows still in flight at shutdown
        # (script addons come before it): none of them may carry a credential.
        for flow in list(self.carrying):
            mask(flow)
        self.carrying.clear()


def _masked(shape: fields.Shape, header: str | None) -> tuple[bool, ...] | None:
    """Which fields of this shape are masked (None: none)."""
    names = ALWAYS_MASKED | {header.lower().encode()} if header else ALWAYS_MASKED
    hide = tuple(n in names for n in shape.lowered)
    return hide if any(hide) else None


def mask(flow: http.HTTPFlow) -> None:
    """Replace the target credential, the upstream proxy's credential and any proxy
    token in the stored request with `********` (a refused request still carries the
    client's token)."""
    header = flow.metadata.get(problem.SECRET_HEADER)
    headers = flow.request.headers
    found = fields.shape(headers)
    masked = found.decide(("mask", header), lambda shape: _masked(shape, header))
    if masked:
        headers.fields = tuple(
            (k, MASK_BYTES) if hide else (k, v)
            for hide, (k, v) in zip(masked, headers.fields, strict=True)
        )
        fields.remember(headers.fields, found)
    param = flow.metadata.get(problem.SECRET_QUERY)
    if param:
        flow.request.path = with_query_param(flow.request.path, param, MASK)
    # A refused request still carries what the client sent: any proxy token, wherever.
    if any(b"ks_" in v for _, v in headers.fields):
        headers.fields = tuple((k, TOKEN_SHAPE.sub(MASK_BYTES, v)) for k, v in headers.fields)
    if b"ks_" in flow.request.data.path:
        flow.request.data.path = TOKEN_SHAPE.sub(MASK_BYTES, flow.request.data.path)
