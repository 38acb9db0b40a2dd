"""A realistic activity log for tests of the dashboard and for its screenshot: a day of
traffic (and a week of lighter history) through four proxies, with refusals, target
errors, timeouts and an outage of the corporate upstream proxy, written with keyswap's
own schema (`sqlite_log`)."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from keyswap.state import migrations
from keyswap.state.backends import open_backend
from keyswap.state.store import iso


def sqlite_log(path: Path) -> Database:
    """An SQLite state database with keyswap's current schema, opened with sqlite-utils
    (for tests that fill or read it as a user would)."""
    with open_backend(path) as backend:
        migrations.upgrade(backend)
    return Database(path)


@dataclass(frozen=True)
class Proxy:
    id: str
    target: str
    base_url: str
    tokens: tuple[str, ...]
    median_ms: float
    weight: float  # share of the traffic
    upstream_proxy: str | None = None


PROXIES = (
    Proxy(
        "openai-agents", "openai", "https://api.openai.com", ("agent-a", "agent-b", "ci"), 820, 0.35
    ),
    Proxy(
        "crm-prod",
        "hubspot",
        "https://api.hubapi.com",
        ("sales-app", "sync-job"),
        180,
        0.25,
        "corporate",
    ),
    Proxy("stripe-billing", "stripe", "https://api.stripe.com", ("web", "backend"), 240, 0.25),
    Proxy("maps-web", "maps", "https://maps.example.com", ("web",), 60, 0.15),
)
PATHS = {
    "openai-agents": ["/v1/chat/completions", "/v1/embeddings", "/v1/models"],
    "crm-prod": ["/crm/v3/objects/contacts", "/crm/v3/owners", "/crm/v3/objects/deals"],
    "stripe-billing": ["/v1/customers", "/v1/invoices", "/v1/payment_intents"],
    "maps-web": ["/geocode/json", "/staticmap", "/directions/json"],
}
DENIALS = [  # (status, message, whether a valid token was used), weighted
    (401, "the token is not valid for this proxy", False),
    (401, "the token is not valid for this proxy", False),
    (403, "a rule of this proxy denies the request", True),
    (429, "rate limit 20/s exceeded", True),
    (405, "method DELETE is not allowed", True),
    (403, "origin https://evil.example may not call this proxy", True),
]


def rows(
    now: float, *, per_hour: int = 600, days: int = 7, seed: int = 16
) -> Iterator[dict[str, Any]]:
    """Rows from `days` ago until `now`: `per_hour` requests an hour in the last day,
    a tenth of that before, rising and falling with the working day (UTC)."""
    rng = random.Random(seed)
    sequence = 0
    start = now - days * 86400
    t = start
    while t < now:
        recent = t >= now - 86400
        hour = time.gmtime(t).tm_hour
        rate = (
            per_hour * (1 if recent else 0.1) * (0.35 + 0.65 * math.sin(math.pi * hour / 24) ** 2)
        )
        t += rng.expovariate(rate / 3600)
        if t >= now:
            return
        sequence += 1
        yield row(rng, t, sequence, outage=now - 4 * 3600 <= t < now - 3.6 * 3600)


def row(rng: random.Random, t: float, sequence: int, *, outage: bool) -> dict[str, Any]:
    if rng.random() < 0.01:
        return base(rng, t, sequence, None) | {
            "path": "/api/unknown/v1/x",
            "status": 404,
            "proxy_code": "proxy-access-denied",
            "message": "no proxy is configured for this path",
            "duration_ms": round(rng.uniform(0.1, 0.6), 3),
        }
    proxy = rng.choices(PROXIES, [p.weight for p in PROXIES])[0]
    out = base(rng, t, sequence, proxy)
    if rng.random() < 0.06:
        status, message, tokened = rng.choice(DENIALS)
        return out | {
            "token_id": out["token_id"] if tokened else None,
            "status": status,
            "proxy_code": "proxy-access-denied",
            "message": message,
            "duration_ms": round(rng.uniform(0.1, 0.8), 3),
            "target_url": None,
            "upstream_proxy": None,
            "attempts": 0,
        }
    via = f" via upstream proxy '{proxy.upstream_proxy}'" if proxy.upstream_proxy else ""
    if outage and proxy.upstream_proxy and rng.random() < 0.7:
        return out | {
            "status": 502,
            "proxy_code": "proxy-error",
            "message": f"target '{proxy.target}'{via} failed: upstream proxy refused authentication (407)",
            "error": "the upstream proxy answered 407 Proxy Authentication Required",
            "duration_ms": round(rng.uniform(2, 15), 3),
        }
    if rng.random() < 0.004:
        return out | {
            "status": 504,
            "proxy_code": "proxy-error",
            "message": f"target '{proxy.target}'{via} did not answer in time",
            "error": "read timed out",
            "duration_ms": 30000.0,
        }
    status = rng.choices([200, 201, 404, 429, 500, 503], [88, 5, 3, 1.5, 1.5, 1])[0]
    return out | {
        "status": status,
        "proxy_code": "proxy-access-granted",
        "message": f"forwarded to target '{proxy.target}'",
        "duration_ms": round(proxy.median_ms * rng.lognormvariate(0, 0.6), 3),
    }


def base(rng: random.Random, t: float, sequence: int, proxy: Proxy | None) -> dict[str, Any]:
    path = rng.choice(PATHS[proxy.id]) if proxy else "/"
    method = "POST" if path.endswith(("completions", "embeddings", "intents")) else "GET"
    headers = {"user-agent": "python-httpx/0.28.1", "authorization": "********"}
    return {
        # time-ordered like new_request_id: milliseconds, a process, a sequence
        "id": f"{int(t * 1000):012x}5eed0016{sequence % 0x1000000:06x}",
        "started_at": iso(t),
        "proxy_id": proxy.id if proxy else None,
        "token_id": rng.choice(proxy.tokens) if proxy else None,
        "target": proxy.target if proxy else None,
        "environment": "prod",
        "client_ip": f"10.0.{rng.randrange(4)}.{rng.randrange(2, 250)}",
        "method": method,
        "path": f"/api/{proxy.id}{path}" if proxy else path,
        "target_url": f"{proxy.base_url}{path}" if proxy else None,
        "upstream_proxy": proxy.upstream_proxy if proxy else None,
        "bytes_in": rng.randrange(200, 4000) if method == "POST" else 0,
        "bytes_out": rng.randrange(300, 40000),
        "user_agent": headers["user-agent"],
        "request_headers": json.dumps(headers),
        "response_headers": json.dumps({"content-type": "application/json"}),
        "attempts": 1,
        "error": None,
    }


def write_log(path: Path, now: float | None = None, **options: Any) -> int:
    """Create the database at `path` with keyswap's schema and generated rows; how many."""
    generated = list(rows(time.time() if now is None else now, **options))
    with closing(sqlite_log(path)) as db:
        db["requests"].insert_all(generated, batch_size=2000)
    return len(generated)


def live_row(rng: random.Random, sequence: int) -> dict[str, Any]:
    """A row of a request that ends now, as a running gateway would add."""
    return row(rng, time.time(), sequence, outage=False)
