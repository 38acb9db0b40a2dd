"""The one place where a secret meets the wire.

A flow is what mitmproxy shows (mitmweb, its API, `flow_detail` on stdout) and saves
(`--save-stream-file`, also for flows still in flight at shutdown). So no stage puts a
credential on the flow: the flow's request carries `********` where the credential goes,
and the stage registers an edit here instead. The HTTP stream (see
`stages/failures.py`, GatewayStream) applies the edits to a copy of the request at the
moment its head is written to the server connection; that copy is the only object that
ever holds the secret, and nothing keeps it once the bytes are written."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from mitmproxy import http

from keyswap.config.secrets import MASK, MASK_BYTES
from keyswap.net import fields
from keyswap.net.urls import with_query_param

Edit = Callable[[http.Request], None]

# flow -> the edits that put its secrets on the wire; dropped when the flow ends (and
# with the flow, should a flow end without a response or error hook).
_pending: weakref.WeakKeyDictionary[http.HTTPFlow, list[Edit]] = weakref.WeakKeyDictionary()


def put_header(flow: http.HTTPFlow, name: bytes, value: bytes) -> None:
    """Header `name` (lower case) is `value` on the wire; the flow shows the mask."""
    fields.put(flow.request.headers, name, MASK_BYTES)
    _pending.setdefault(flow, []).append(lambda r: fields.put(r.headers, name, value))


def put_query(flow: http.HTTPFlow, name: str, value: str) -> None:
    """Query parameter `name` is `value` on the wire; the flow shows the mask."""
    flow.request.path = with_query_param(flow.request.path, name, MASK)

    def edit(request: http.Request) -> None:
        request.path = with_query_param(request.path, name, value)

    _pending.setdefault(flow, []).append(edit)


def for_wire(flow: http.HTTPFlow | None, request: http.Request) -> http.Request:
    """The request to write to the server: `request` itself, or a copy with the flow's
    secrets on it."""
    edits = _pending.get(flow) if flow is not None else None
    if not edits:
        return request
    wire = _shallow(request)
    wire.data = _shallow(request.data)
    # A shallow copy shares the fields tuple, which the edits replace, never change.
    wire.data.headers = _shallow(request.data.headers)
    for edit in edits:
        edit(wire)
    return wire


def _shallow[T](obj: T) -> T:
    """A shallow copy of a plain object (what `copy.copy` makes, without its protocol
    lookups: this runs for every request)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def forget(flow: http.HTTPFlow) -> None:
    """The flow is over: its secrets are not needed any more."""
    _pending.pop(flow, None)
