"""The config compiled for serving: route table, token index, where each proxy's token
may stand, rate-limit rows, header plans and what forward mode intercepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from keyswap.config.loader import LoadedConfig
from keyswap.config.model import Config, Credential, HeaderCredential, QueryCredential
from keyswap.config.tokens import TOKEN_HEADERS
from keyswap.forward.origins import ForwardIndex
from keyswap.gateway.header_plan import Plan, request_plan, response_plan
from keyswap.gateway.routes import RouteTable
from keyswap.state.rate_limits import Rate


@dataclass(frozen=True)
class TokenPlaces:
    """Where a proxy's token may stand besides `x-proxy-token` and `Authorization`: where
    its target credential goes, so that an SDK given the token as its API key works.
    Worked out once per config, from the proxy's target's credential."""

    header: bytes | None = None  # a `header` credential's name, lower case
    query: str | None = None  # a `query` credential's parameter as a URL writes it: `key=`

    @classmethod
    def of(cls, credential: Credential | None) -> TokenPlaces:
        if isinstance(credential, HeaderCredential) and credential.name not in TOKEN_HEADERS:
            return cls(header=credential.name.encode())  # the model lower-cases it
        if isinstance(credential, QueryCredential):
            # The raw name, as the swap matches it: a parameter the swap would not
            # replace can never be the one the token is read from.
            return cls(query=quote(credential.name, safe="") + "=")
        return NO_PLACES  # bearer, basic, oauth2: Authorization, which is always looked at


NO_PLACES = TokenPlaces()


@dataclass(frozen=True)
class Runtime:
    """One immutable snapshot of what the gateway serves; swapped whole on reload."""

    loaded: LoadedConfig | None
    routes: RouteTable = field(default_factory=lambda: RouteTable(()))
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # digest -> proxy, token id
    # proxy -> its row in `rate_limits` and its rate; the row, in the state database, is
    # all the state a limit has, so a reload keeps it and a changed rate gets a new row
    rate_limits: dict[str, tuple[str, Rate]] = field(default_factory=dict)
    header_plans: dict[str, tuple[Plan, Plan]] = field(default_factory=dict)  # request, response
    token_places: dict[str, TokenPlaces] = field(default_factory=dict)
    served: frozenset[str] = frozenset()  # the proxies this environment and region serve
    forward: ForwardIndex = field(default_factory=ForwardIndex)  # what forward mode intercepts

    @property
    def config(self) -> Config:
        if self.loaded is None:
            raise RuntimeError("keyswap has no configuration loaded")
        return self.loaded.config

    @classmethod
    def build(cls, loaded: LoadedConfig) -> Runtime:
        config = loaded.config
        # Served proxies claim their routes first; the others stay routable so that a
        # request to them is told why it is refused instead of "unknown route".
        served = frozenset(p for p in config.proxies if config.serves(p))
        order = sorted(config.proxies, key=lambda p: p not in served)
        routes = RouteTable((r, pid) for pid in order for r in config.routes_of(pid))
        tokens = {
            t.sha256: (pid, t.id) for pid, proxy in config.proxies.items() for t in proxy.tokens
        }
        rate_limits: dict[str, tuple[str, Rate]] = {}
        for pid, proxy in config.proxies.items():
            if proxy.rate_limit is not None:
                rate = Rate.parse(proxy.rate_limit)
                rate_limits[pid] = (rate.key(pid), rate)
        header_plans = {
            pid: (request_plan(proxy.request_headers), response_plan(proxy.response_headers))
            for pid, proxy in config.proxies.items()
        }
        token_places = {
            pid: TokenPlaces.of(config.credentials.get(config.targets[proxy.target].credential))
            for pid, proxy in config.proxies.items()
        }
        return cls(
            loaded,
            routes,
            tokens,
            rate_limits,
            header_plans,
            token_places,
            served,
            ForwardIndex.of(config),
        )
