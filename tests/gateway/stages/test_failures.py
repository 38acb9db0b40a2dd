import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from keyswap.gateway import problem
from keyswap.gateway.stages.failures import (
    CONNECT,
    PROXY,
    TARGET,
    TIMED_OUT,
    describe,
    failure_response,
)
from keyswap.gateway.stages.upstream import UPSTREAM

# mitmproxy's own error texts (and the OS's under them), as they reach the stream.
REFUSED = "[Errno 111] Connect call failed ('10.20.30.40', 9199)"


@pytest.mark.parametrize(
    ("error", "phrase", "step"),
    [
        (REFUSED, "connection refused", CONNECT),
        (
            "Multiple exceptions: [Errno 111] Connect call failed ('::1', 9199, 0, 0), "
            "[Errno 111] Connect call failed ('10.20.30.40', 9199)",
            "connection refused",
            CONNECT,
        ),
        ("[Errno -2] Name or service not known", "host name not found (DNS)", CONNECT),
        ("[Errno -3] Temporary failure in name resolution", "host name not found (DNS)", CONNECT),
        ("[Errno 101] Network is unreachable", "network unreachable", CONNECT),
        (
            "Upstream proxy 10.20.30.40:3128 refused HTTP CONNECT request: "
            "407 Proxy Authentication Required",
            "upstream proxy refused the tunnel (CONNECT answered 407)",
            PROXY,
        ),
        (
            "Error connecting to 10.20.30.40:3128: bad response",
            "upstream proxy gave an invalid answer to CONNECT",
            PROXY,
        ),
        (
            "Certificate verify failed: unable to get local issuer certificate",
            "TLS: certificate not trusted (unable to get local issuer certificate)",
            TARGET,
        ),
        (
            "Certificate verify failed: self-signed certificate",
            "TLS: certificate not trusted (self-signed certificate)",
            TARGET,
        ),
        ("tlsv1 alert unknown ca", "TLS: the client certificate was refused", TARGET),
        ("The remote server does not speak TLS.", "TLS: the server does not speak TLS", TARGET),
        ("OpenSSL Error([('SSL routines', '', 'x')])", "TLS handshake failed", TARGET),
        ("server closed connection", "connection closed before the response was complete", TARGET),
        ("Cannot parse HTTP response: b'\\x00\\x01'", "invalid HTTP response", TARGET),
        ("something new at 10.20.30.40:9199", "connection failed", TARGET),
    ],
)
def test_describe_says_the_kind_never_the_address(error: str, phrase: str, step: str) -> None:
    assert describe(error) == (phrase, step)
    assert "10.20.30.40" not in phrase and "9199" not in phrase and "3128" not in phrase


def granted(**metadata: object) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.metadata.update({problem.TARGET: "billing", problem.REQUEST_ID: "r1", **metadata})
    return flow


def test_a_refused_connection_is_named_by_target_and_logged_in_full() -> None:
    flow = granted()
    response = failure_response(flow, REFUSED)
    assert response is not None and response.status_code == 502
    body = json.loads(response.content or b"")
    assert body["type"] == "urn:keyswap:problem:unreachable"
    assert body["detail"] == "target 'billing' failed: connection refused"
    assert response.headers["keyswap-proxy-message"] == body["detail"]
    assert flow.metadata[problem.ERROR] == REFUSED  # the activity log's `error` column


def test_a_refused_connection_through_a_proxy_is_the_proxy_s() -> None:
    response = failure_response(granted(**{UPSTREAM: "corp"}), REFUSED)
    assert response is not None
    body = json.loads(response.content or b"")
    assert body["type"] == "urn:keyswap:problem:upstream-proxy"
    assert body["detail"] == (
        "target 'billing' via upstream proxy 'corp' failed: "
        "upstream proxy unreachable (connection refused)"
    )


def test_a_timeout_is_a_504() -> None:
    response = failure_response(granted(**{TIMED_OUT: True}), "connection cancelled")
    assert response is not None and response.status_code == 504
    assert response.headers["keyswap-proxy-message"] == "target 'billing' did not answer in time"


def test_flows_the_gateway_did_not_grant_or_answered_itself_are_left_alone() -> None:
    assert failure_response(tflow.tflow(), REFUSED) is None
    assert failure_response(granted(**{problem.ANSWERED: True}), REFUSED) is None
