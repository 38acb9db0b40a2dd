"""`GET /_keyswap/health`: is the gateway up, and what is it serving. No token, no secret.

An answered probe is not an activity log row (a load balancer probing every second
would be most of the log); it is counted here, as `probes_served`. A refused one (a
method other than GET or HEAD, another `/_keyswap/...` path) is a row like any other
refusal: someone is knocking on a reserved path."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from keyswap import __version__
from keyswap.gateway import problem

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

PATH = "/_keyswap/health"
PROBE = "keyswap.health_probe"  # flow.metadata: an answered probe, which gets no row


class Health:
    """Answers the health endpoint with the served config's digest, load time and counts."""

    def __init__(
        self, settings: Settings, reporters: dict[str, Callable[[], dict[str, Any]]] | None = None
    ) -> None:
        self.settings = settings
        self.started = time.time()
        self.reporters = reporters or {}
        self.probes_served = 0

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not flow.metadata.get(problem.RESERVED):
            return
        if flow.request.path.split("?", 1)[0] != PATH:
            problem.deny(flow, 404, "unknown-route", "no keyswap endpoint at this path")
            return
        if flow.request.method not in ("GET", "HEAD"):
            message = "the health endpoint answers GET and HEAD"
            problem.deny(flow, 405, "method", message, {"allow": "GET, HEAD"})
            return
        self.probes_served += 1
        report = self.report()
        # A gateway that cannot reach its state database still forwards requests (their
        # rows wait in the queue), but it is not healthy: a balancer should prefer another.
        healthy = report.get("backend", {}).get("reachable", True)
        if not healthy:
            report["status"] = "backend-unreachable"
        body = json.dumps(report, indent=2).encode()
        flow.response = http.Response.make(
            200 if healthy else 503,
            body,
            {"content-type": "application/json", "cache-control": "no-store"},
        )
        flow.metadata[problem.ANSWERED] = True
        flow.metadata[PROBE] = True
        problem.decide(flow, problem.GRANTED, "health report")
        problem.stamp(flow, flow.response)

    def report(self) -> dict[str, Any]:
        runtime = self.settings.runtime
        report: dict[str, Any] = {"status": "ok", "version": __version__}
        report["pid"] = os.getpid()  # which process answered, when several share the port
        report["uptime_s"] = round(time.time() - self.started, 1)
        report["probes_served"] = self.probes_served  # this one included
        if runtime.loaded is not None:
            c = runtime.config
            report["config"] = {
                "path": str(runtime.loaded.path),
                "digest": runtime.loaded.digest,
                "loaded_at": _iso(runtime.loaded.loaded_at),
                "environment": c.environment,
                "region": c.region,
                "proxies": len(c.proxies),
                "proxies_served": sum(c.serves(p) for p in c.proxies),
                "targets": len(c.targets),
            }
        for name, reporter in self.reporters.items():
            report[name] = reporter()
        return report


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
