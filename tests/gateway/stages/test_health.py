import json
import os

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from keyswap.gateway import problem
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.health import PROBE, Health


def probe(path: str = "/_keyswap/health", method: str = "GET") -> http.HTTPFlow:
    flow = tflow.tflow(req=http.Request.make(method, f"http://gw{path}"))
    flow.metadata.update({problem.REQUEST_ID: "r1", problem.RESERVED: True})  # as routed
    return flow


def test_a_probe_is_answered_and_counted_as_served() -> None:
    health = Health(Settings(), {"activity_log": lambda: {"rows_written": 3}})
    for n in (1, 2):
        flow = probe("/_keyswap/health?verbose=1" if n == 2 else "/_keyswap/health")
        health.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 200
        report = json.loads(flow.response.content or b"")
        assert report["probes_served"] == n  # this probe included
        assert report["pid"] == os.getpid()  # which worker answered, when several share a port
        assert report["activity_log"] == {"rows_written": 3}
        assert flow.metadata[PROBE] is True  # the recorder writes no row for it
        assert flow.response.headers[problem.CODE_HEADER] == problem.GRANTED


def test_head_is_a_probe_too() -> None:
    health = Health(Settings())
    flow = probe(method="HEAD")
    health.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert PROBE in flow.metadata and health.probes_served == 1


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/_keyswap/health", "POST", 405),
        ("/_keyswap/health", "DELETE", 405),
        ("/_keyswap/healthz", "GET", 404),
        ("/_keyswap", "GET", 404),
        ("/_keyswap/requests/1", "GET", 404),
    ],
)
def test_a_refused_probe_is_not_counted_and_keeps_its_row(
    path: str, method: str, status: int
) -> None:
    health = Health(Settings())
    flow = probe(path, method)
    health.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == status
    assert PROBE not in flow.metadata and health.probes_served == 0
    assert flow.response.headers[problem.CODE_HEADER] == problem.DENIED
    if status == 405:
        assert flow.response.headers["allow"] == "GET, HEAD"


def test_only_reserved_paths_are_health_s_business() -> None:
    health = Health(Settings())
    flow = probe()
    del flow.metadata[problem.RESERVED]  # routed to a proxy, or refused before
    health.requestheaders(flow)
    assert flow.response is None and health.probes_served == 0


@pytest.mark.parametrize(
    ("reachable", "status", "said"), [(True, 200, "ok"), (False, 503, "backend-unreachable")]
)
def test_an_unreachable_state_database_makes_the_gateway_unhealthy(
    reachable: bool, status: int, said: str
) -> None:
    backend = {
        "kind": "postgresql",
        "reachable": reachable,
        "latency_ms": 1.5 if reachable else None,
    }
    health = Health(Settings(), {"backend": lambda: backend})
    flow = probe()
    health.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == status
    report = json.loads(flow.response.content or b"")
    assert report["status"] == said and report["backend"] == backend
