from mitmproxy.test import tflow

from keyswap.gateway import wire


def test_secrets_exist_only_on_the_copy_written_to_the_server() -> None:
    flow = tflow.tflow()
    flow.request.path = "/x?a=1&key=client"
    wire.put_header(flow, b"authorization", b"Bearer real-secret")
    wire.put_query(flow, "key", "query-secret")
    assert flow.request.headers["authorization"] == "********"
    assert flow.request.path == "/x?a=1&key=********"
    sent = wire.for_wire(flow, flow.request)
    assert sent is not flow.request
    assert sent.headers["authorization"] == "Bearer real-secret"
    assert sent.path == "/x?a=1&key=query-secret"
    # the flow, what mitmproxy shows and saves, is untouched by the copy
    assert "real-secret" not in str(flow.get_state())
    assert "query-secret" not in str(flow.get_state())
    wire.forget(flow)
    assert wire.for_wire(flow, flow.request) is flow.request


def test_a_flow_without_secrets_is_written_as_it_is() -> None:
    flow = tflow.tflow()
    assert wire.for_wire(flow, flow.request) is flow.request
    assert wire.for_wire(None, flow.request) is flow.request
