"""The credential swap: the target credential is registered to go on the request as it is
written to the target (see wire.py), so the flow itself only ever shows `********`; and
what the client sent that must not be kept comes off the stored flow when it ends."""

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
from keyswap.config.secrets import MASK_BYTES, mask_token_bytes, mask_tokens
from keyswap.config.tokens import TOKEN_HEADERS
from keyswap.gateway import problem, wire
from keyswap.net import fields

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

ALWAYS_MASKED = frozenset({b"proxy-authorization", *(n.encode() for n in TOKEN_HEADERS)})


class CredentialSwap:
    """Registers the target credential of granted requests for the wire, and masks what
    the client sent once the flow is done."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            mask(flow)  # refused: before mitmweb shows the new flow, not when it ends
            return
        if not flow.live or problem.DESTINATION not in flow.metadata:
            return
        config = self.settings.runtime.config
        target = config.targets[flow.metadata[problem.TARGET]]
        credential = config.credentials[target.credential]
        match credential:
            case BearerCredential(token=token):
                secret = f"Bearer {token.get_secret_value()}".encode("utf-8", "surrogateescape")
                wire.put_header(flow, b"authorization", secret)
            case BasicCredential(username=user, password=password):
                pair = f"{user}:{password.get_secret_value()}".encode("utf-8", "surrogateescape")
                wire.put_header(flow, b"authorization", b"Basic " + base64.b64encode(pair))
            case HeaderCredential(name=name, value=value):
                secret = value.get_secret_value().encode("utf-8", "surrogateescape")
                wire.put_header(flow, name.lower().encode(), secret)
            case QueryCredential(name=name, value=value):
                wire.put_query(flow, name, value.get_secret_value())
            case OAuth2Credential():
                pass  # the OAuth2 addon fetches and applies it

    def response(self, flow: http.HTTPFlow) -> None:
        wire.forget(flow)
        mask(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        wire.forget(flow)
        mask(flow)


def _masked(shape: fields.Shape) -> tuple[bool, ...] | None:
    """Which fields of this shape are masked (None: none)."""
    hide = tuple(n in ALWAYS_MASKED for n in shape.lowered)
    return hide if any(hide) else None


def mask(flow: http.HTTPFlow) -> None:
    """Mask what the client sent that must not be kept: its proxy credential headers and
    anything shaped like a proxy token, wherever (a refused request still carries them,
    and mitmproxy's error message may quote them).
    The target credential is never on the flow at all (see wire.py)."""
    headers = flow.request.headers
    found = fields.shape(headers)
    masked = found.decide("mask", _masked)
    if masked:
        headers.fields = tuple(
            (k, MASK_BYTES) if hide else (k, v)
            for hide, (k, v) in zip(masked, headers.fields, strict=True)
        )
        fields.remember(headers.fields, found)
    if any(b"ks_" in v for _, v in headers.fields):
        headers.fields = tuple((k, mask_token_bytes(v)) for k, v in headers.fields)
    flow.request.data.path = mask_token_bytes(flow.request.data.path)
    if flow.error is not None:  # mitmproxy's own message may quote the client's bytes
        flow.error.msg = mask_tokens(flow.error.msg)
