"""Header filtering: what the target must not see, and what the client must not get back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http
from mitmproxy.http import Headers

from keyswap.config.tokens import SHAPE_BYTES as TOKEN_SHAPE
from keyswap.gateway import problem
from keyswap.gateway.header_plan import UNKNOWN_PROXY_RESPONSE, Plan

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings


def filter_request(plan: Plan, headers: Headers) -> None:
    """A request's headers as a target may see them: the proxy's request plan applied,
    and a proxy token never left, wherever the client put it (an SDK's own key header,
    a second copy; the policy stage left it out of the query already). The target
    credential goes on after."""
    plan.apply(headers)
    fields = headers.fields
    if any(b"ks_" in v for _, v in fields):
        headers.fields = tuple(f for f in fields if not TOKEN_SHAPE.search(f[1]))


class HeaderFilter:
    """Strips what must not cross the gateway, in both directions, and applies the
    proxy's own `request_headers` / `response_headers` settings (compiled into `Plan`s
    by the runtime)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or problem.DESTINATION not in flow.metadata:
            return
        plans = self.settings.runtime.header_plans[flow.metadata[problem.PROXY]]
        filter_request(plans[0], flow.request.headers)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or flow.metadata.get(problem.ANSWERED):
            return
        plans = self.settings.runtime.header_plans.get(flow.metadata.get(problem.PROXY, ""))
        (plans[1] if plans else UNKNOWN_PROXY_RESPONSE).apply(response.headers)
        problem.stamp(flow, response)
