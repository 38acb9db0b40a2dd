"""Routing: the request path's prefix picks the proxy, on whole path segments. A flow
replayed from mitmweb (or `--client-replay`) goes nowhere: it is refused here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap.config.model import RESERVED_PREFIX
from keyswap.config.secrets import mask_tokens
from keyswap.config.tokens import SHAPE as TOKEN_SHAPE
from keyswap.gateway import problem

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings


class Router:
    """Finds the proxy a request's path belongs to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay == "request":  # before the guard: it overrides an earlier refusal
            refuse_replay(flow)
            return
        if flow.response or flow.error or not flow.live:
            return
        if problem.FORWARD in flow.metadata:
            return  # forward mode's flow, routed by its destination (forward_routing.py)
        path = client_path(flow)
        if path is None:
            return
        if path == RESERVED_PREFIX or path.startswith(RESERVED_PREFIX + "/"):
            flow.metadata[problem.RESERVED] = True
            return
        match = self.settings.runtime.routes.match(path)
        if match is None:
            problem.deny(flow, 404, "unknown-route", "no proxy is configured for this path")
            return
        proxy_id, route, rest = match
        flow.metadata[problem.PROXY] = proxy_id
        flow.metadata[problem.ROUTE] = route
        flow.metadata[problem.REST] = rest


def client_path(flow: http.HTTPFlow, origin: str = "") -> str | None:
    """The request's path as text, without its query; or None, the request refused (not
    UTF-8, or a proxy token in the path). Also keeps, as `problem.PATH`, what the client
    asked for (its `origin` first in forward mode): flow metadata is saved and shown
    with the flow, so anything shaped like a proxy token is masked in it. (Stages that
    need the raw query read it from the request, which the rewrite stage replaces.)"""
    raw = flow.request.data.path
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        flow.metadata[problem.PATH] = origin + raw.decode("utf-8", "replace")
        problem.deny(flow, 400, "bad-request", "the path is not UTF-8; percent-encode it")
        return None
    flow.metadata[problem.PATH] = mask_tokens(origin + text)
    path = text.partition("?")[0]
    if "ks_" in path and TOKEN_SHAPE.search(path):
        problem.deny(flow, 400, "bad-request", "a proxy token in the URL path is never forwarded")
        return None
    return path


# What a replay keeps of the flow's previous pass: its new id (the firewall's), and the
# proxy and path it was sent to, so that its row and mitmweb say what was replayed.
KEPT_ON_REPLAY = (problem.REQUEST_ID, problem.PROXY, problem.PATH)
REPLAY_MESSAGE = (
    "keyswap never replays a stored flow: it holds no proxy token and was rewritten for "
    "its target; send the request again from its client"
)


def refuse_replay(flow: http.HTTPFlow) -> None:
    """Refuse a replayed flow, as a new request with its own id, row and decision.

    A stored flow cannot be authenticated again: the client's token was never kept (the
    flow shows `********`), and its request is the one rewritten for the target, with
    `********` where the credential goes. Replaying it through the stages would need
    them to undo their own rewrite, and a mistake there would send the mask, or skip
    authentication; refused here, before any stage acts on it, it cannot."""
    meta = flow.metadata
    kept = {key: meta[key] for key in KEPT_ON_REPLAY if key in meta}
    for key in [key for key in meta if key.startswith("keyswap.")]:
        del meta[key]  # the previous pass's decisions, row flag, connection and timers
    meta.update(kept)
    if problem.PATH in kept:  # the path as the client sent it (tokens masked), not the target's
        flow.request.data.path = kept[problem.PATH].encode("utf-8", "surrogateescape")
    problem.deny(flow, 403, "replay", REPLAY_MESSAGE)
