"""What forward mode intercepts and what it tunnels untouched, worked out once per
config: each target origin (a target's base URL's origin and its `allowed_hosts`) with
the proxies whose target serves it, and the `forward.passthrough` host names. Every
other host is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from keyswap.config.model import Config
from keyswap.net.urls import origin_of

Endpoint = tuple[str, int]  # host (lower case, IPv6 without brackets) and port


def split_origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL or origin, the port filled in from the scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


@dataclass(frozen=True)
class ForwardIndex:
    """Forward mode's view of one config."""

    # origin (`https://host[:port]`, as net.urls writes it) -> proxies whose target
    # serves it, in config order
    origins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    endpoints: frozenset[Endpoint] = frozenset()  # where an intercepted tunnel may go
    passthrough: frozenset[str] = frozenset()  # exact host names
    passthrough_domains: tuple[str, ...] = ()  # `.example.org` for `*.example.org`

    @classmethod
    def of(cls, config: Config) -> ForwardIndex:
        served: dict[str, list[str]] = {}
        for proxy_id, proxy in config.proxies.items():
            target = config.targets[proxy.target]
            for url in (target.base_url, *target.allowed_hosts):
                origin = origin_of(*split_origin(url))
                if proxy_id not in served.setdefault(origin, []):
                    served[origin].append(proxy_id)
        endpoints = frozenset(split_origin(origin)[1:] for origin in served)
        hosts = config.forward.passthrough
        return cls(
            {origin: tuple(ids) for origin, ids in served.items()},
            endpoints,
            frozenset(h for h in hosts if not h.startswith("*.")),
            tuple(h[1:] for h in hosts if h.startswith("*.")),
        )

    def intercepts(self, host: str, port: int) -> bool:
        """Whether a CONNECT to `host:port` opens an intercepted tunnel: some target's
        origin is there (which scheme it speaks is known once the client speaks)."""
        return (host, port) in self.endpoints

    def passes_through(self, host: str) -> bool:
        """Whether `host` (as the client named it) is tunnelled untouched."""
        return host in self.passthrough or any(host.endswith(d) for d in self.passthrough_domains)

    def proxies_for(self, origin: str) -> tuple[str, ...]:
        """The proxies whose target serves `origin`; none: the origin is not a target's."""
        return self.origins.get(origin, ())
