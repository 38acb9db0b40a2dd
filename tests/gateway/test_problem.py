import json

import pytest
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
        "error": {
            "type": "rate_limit_error",
            "code": "rate-limit",
            "message": "too fast Injected: x",
        },
    }
    assert flow.metadata[problem.ANSWERED] is True


def test_server_side_statuses_are_proxy_errors() -> None:
    flow = tflow.tflow()
    response = problem.make(flow, 504, "timeout", "slow")
    assert response.headers["keyswap-proxy-code"] == "proxy-error"


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (408, "timeout_error"),
        (413, "invalid_request_error"),
        (414, "invalid_request_error"),
        (429, "rate_limit_error"),
        (431, "invalid_request_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
    ],
)
def test_the_error_member_is_what_sdks_read(status: int, error_type: str) -> None:
    """`error: {type, code, message}`: the shape the OpenAI, Anthropic and Stripe SDKs
    read for their exception's message; `code` is the problem type's slug."""
    flow = tflow.tflow()
    body = json.loads(problem.make(flow, status, "some-reason", "why, in one line").content or b"")
    assert body["error"] == {
        "type": error_type,
        "code": "some-reason",
        "message": "why, in one line",
    }
    assert body["detail"] == body["error"]["message"]
