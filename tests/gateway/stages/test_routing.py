import json

from mitmproxy import http
from mitmproxy.test import tflow

from keyswap.gateway import problem
from keyswap.gateway.settings import Settings
from keyswap.gateway.stages.recorder import RECORDED
from keyswap.gateway.stages.routing import REPLAY_MESSAGE, Router
from keyswap.gateway.stages.upstream import UPSTREAM


def replayed() -> http.HTTPFlow:
    """A granted flow after its pass through the gateway, queued again by mitmweb's replay:
    the target's URL and the mask where the credential went, the decisions of the first
    pass in its metadata, and the firewall's fresh request id."""
    flow = tflow.tflow(req=http.Request.make("GET", "http://api.example/v1/x?key=********"))
    flow.request.headers["authorization"] = "********"
    flow.metadata.update(
        {
            problem.REQUEST_ID: "r2",
            problem.PROXY: "crm",
            problem.PATH: "/api/crm/x?key=********",
            problem.TARGET: "crm-api",
            problem.DESTINATION: {"scheme": "http", "host": "api.example", "port": 80},
            problem.CODE: problem.GRANTED,
            RECORDED: True,
            UPSTREAM: "corporate",
        }
    )
    flow.is_replay = "request"
    return flow


def test_a_replay_is_refused_as_a_new_request() -> None:
    flow = replayed()
    Router(Settings()).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    body = json.loads(flow.response.content or b"")
    assert body["type"] == "urn:keyswap:problem:replay"
    assert body["request_id"] == "r2"
    assert flow.response.headers[problem.CODE_HEADER] == problem.DENIED
    assert flow.response.headers[problem.MESSAGE_HEADER] == REPLAY_MESSAGE
    # Nothing of the first pass is left to act on: no destination, no row flag, no route.
    assert set(flow.metadata) == {
        problem.REQUEST_ID,
        problem.PROXY,
        problem.PATH,
        problem.CODE,
        problem.MESSAGE,
        problem.ANSWERED,
    }
    assert flow.request.path == "/api/crm/x?key=********"  # as the client sent it


def test_a_replay_is_refused_whatever_refused_it_before() -> None:
    flow = replayed()
    problem.deny(flow, 503, "shutting-down", "this gateway is shutting down")
    Router(Settings()).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.metadata[problem.MESSAGE] == REPLAY_MESSAGE


def test_a_client_request_is_not_a_replay() -> None:
    flow = tflow.tflow(req=http.Request.make("GET", "http://gw/_keyswap/health"))
    Router(Settings()).requestheaders(flow)
    assert flow.response is None and flow.metadata[problem.RESERVED] is True
