"""A proxy's rules: active, environment, methods, path rules and rate limit."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from functools import lru_cache
from typing import TYPE_CHECKING

from mitmproxy import http

from keyswap.config.model import Proxy, Rule
from keyswap.config.tokens import without_tokens
from keyswap.gateway import delivery, problem
from keyswap.gateway.rate_limit import RateLimits, Unavailable, retry_after
from keyswap.gateway.stages.rewrite import Destination, Refused, resolve
from keyswap.net.urls import origin_of
from keyswap.state.rate_limits import Rate

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings


# Refused unless a proxy lists them in `methods`: TRACE echoes the request (and its
# credentials) back, TRACK is its IIS twin.
UNSAFE_METHODS = frozenset({"TRACE", "TRACK"})
# A control character a path spells percent-encoded (the firewall refuses raw ones):
# lenient backends trim or cut at `%09` and `%00`, so a rule could not say what it means.
_ENCODED_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DEFAULT_ALLOW = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@lru_cache(maxsize=1024)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches inside one segment, `**` across segments; `/x/**` also matches `/x`."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.IGNORECASE)


def rule_path(relative: str) -> str:
    """The path rules are matched against: decoded and dot-free (as `relative` is), and
    then as lenient backends read it, so a rule cannot be dodged by spelling: each
    segment without its `;` parameters and trailing dots and spaces (matching ignores
    case too). `/ADMIN;jsessionid=1/` and `/admin./` are `/admin/`."""
    if ";" not in relative and "." not in relative and " " not in relative:
        return relative
    return "/".join(segment.partition(";")[0].rstrip(". ") for segment in relative.split("/"))


def rule_verdict(rules: list[Rule], method: str, path: str) -> Rule | None:
    """The first rule that matches the request, or None (default allow)."""
    for rule in rules:
        match = rule.match
        if match.methods is not None and method not in match.methods:
            continue
        if match.path is not None and not glob_regex(match.path).fullmatch(path):
            continue
        return rule
    return None


class Policy:
    """Applies a proxy's rules once the caller is authenticated."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rate_limits: RateLimits | None = None

    def running(self) -> None:
        if self.settings.source is not None:
            self.rate_limits = RateLimits(self.settings.db_path())

    def done(self) -> None:
        if self.rate_limits is not None:
            self.rate_limits.close()

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Synchronous unless the proxy has a rate limit: its step is the only wait here.
        if flow.response or flow.error or not flow.live or problem.PROXY not in flow.metadata:
            return None
        runtime = self.settings.runtime
        proxy_id = flow.metadata[problem.PROXY]
        config = runtime.config
        proxy: Proxy = config.proxies[proxy_id]
        if not proxy.active:
            problem.deny(flow, 403, "inactive", f"proxy '{proxy_id}' is disabled")
            return None
        if proxy_id not in runtime.served:
            problem.deny(
                flow,
                403,
                "not-served",
                f"proxy '{proxy_id}' is not served in environment "
                f"'{config.environment}'" + _region(config.region),
            )
            return None
        method = flow.request.method.upper()
        allowed = proxy.methods
        if method not in allowed if allowed is not None else method in UNSAFE_METHODS:
            allow = ", ".join(allowed if allowed is not None else DEFAULT_ALLOW)
            problem.deny(flow, 405, "method", f"method {method} is not allowed", {"allow": allow})
            return None
        # As sent (the rewrite comes later), without any parameter holding a proxy
        # token: the destination, and so the target and the flow, never see one.
        query = without_tokens(flow.request.path.partition("?")[2])
        target = config.targets[proxy.target]
        try:
            dest = resolve(target, flow.metadata[problem.REST], query)
        except Refused as e:
            problem.deny(flow, 403, "host", str(e))
            return None
        forward = flow.metadata.get(problem.FORWARD)
        if forward is not None and origin_of(dest.scheme, dest.host, dest.port) != forward:
            problem.deny(flow, 403, "host", f"the request leaves its tunnel's origin {forward}")
            return None
        if "%" in flow.metadata[problem.REST] and _ENCODED_CONTROL.search(dest.relative):
            message = "the path holds a percent-encoded control character"
            problem.deny(flow, 400, "bad-request", message)
            return None
        rule = rule_verdict(proxy.rules, method, rule_path(dest.relative))
        if rule is not None and rule.action == "deny":
            problem.deny(flow, 403, "rule", "a rule of this proxy denies the request")
            return None
        limit = runtime.rate_limits.get(proxy_id)
        # An async request took its place under the rate limit when it was accepted.
        if limit is not None and delivery.attempt_of(flow) is None:
            return self._rate_limited(flow, proxy, dest, *limit)
        grant(flow, proxy, dest)
        return None

    async def _rate_limited(
        self, flow: http.HTTPFlow, proxy: Proxy, dest: Destination, key: str, rate: Rate
    ) -> None:
        """The last check: a place under the proxy's rate limit, shared by every gateway
        on the state database. When the database cannot say, the request is refused."""
        try:
            if self.rate_limits is None:
                raise Unavailable("keyswap is not running")
            wait = await self.rate_limits.take(key, rate)
        except Unavailable as e:
            if not flow.response and flow.live:
                problem.deny(
                    flow,
                    503,
                    "rate-limit-unavailable",
                    "the proxy's rate limit cannot be checked now; try again shortly",
                    {"retry-after": "1"},
                )
                flow.metadata[problem.ERROR] = f"rate limit unavailable: {e}"
            return
        if flow.response or not flow.live:
            return
        if wait:
            problem.deny(
                flow,
                429,
                "rate-limit",
                f"rate limit {proxy.rate_limit} exceeded",
                {"retry-after": retry_after(wait)},
            )
            return
        grant(flow, proxy, dest)


def grant(flow: http.HTTPFlow, proxy: Proxy, dest: Destination) -> None:
    """Every check passed: the flow goes to the proxy's target, at `dest`."""
    flow.metadata[problem.TARGET] = proxy.target
    flow.metadata[problem.DESTINATION] = {
        "scheme": dest.scheme,
        "host": dest.host,
        "port": dest.port,
        "path": dest.path,
    }


def _region(region: str | None) -> str:
    return f" (region '{region}')" if region else ""
