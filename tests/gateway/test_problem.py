import json

from mitmproxy.test import tflow

from keyswap.gateway import problem


def test_problem_responses_follow_rfc_9457() -> None:
    flow = tflow.tflow()
    flow.metadata[problem.REQUEST_ID] = "rid"
    problem.deny(flow, 429, "rate-limit", "too fast\r\nInjected: x", {"retry-after": "3"})
    r = flow.response
    assert r is not None and r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "3"
    assert r.headers["keyswap-proxy-code"] == "proxy-access-denied"
    assert r.headers["keyswap-proxy-message"] == "too fast Injected: x"
    assert r.headers["keyswap-request-id"] == "rid"
    assert json.loads(r.content or b"") == {
        "type": "urn:keyswap:problem:rate-limit",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "too fast Injected: x",
        "request_id": "rid",
    }
    assert flow.metadata[problem.ANSWERED] is True


def test_server_side_statuses_are_proxy_errors() -> None:
    flow = tflow.tflow()
    response = problem.make(flow, 504, "timeout", "slow")
    assert response.headers["keyswap-proxy-code"] == "proxy-error"
