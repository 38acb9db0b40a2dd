"""The activity log: one `requests` row per flow that reached the gateway, denied ones
included, written when the flow ends (`response` or `error`); answered health probes
are counted by the health stage instead. Secrets never reach a row: credential headers,
cookies and the config's credential header and query names are stored as `********`,
and body previews have every configured secret value masked.

Being last, it also says on each flow what keyswap decided, for mitmweb: the comment
(`proxy · code · message`, the flow list's comment column) and a marker on refused and
failed flows; and a flow that went to no target shows the gateway's own URL.

It opens the state backend at start (upgrading its schema: a database of a newer
version stops the gateway), and registers the gateway in it (keyswap.state.registry)
until a clean shutdown."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import RegularMode

from keyswap.config.loader import LoadedConfig
from keyswap.config.secrets import Redaction
from keyswap.gateway import problem
from keyswap.gateway.stages.auth import TOKEN_ID
from keyswap.gateway.stages.health import PROBE
from keyswap.gateway.stages.upstream import UPSTREAM
from keyswap.net import fields
from keyswap.net.text import shown
from keyswap.net.urls import authority, origin_of
from keyswap.state import migrations
from keyswap.state.backends import Backend, StateError, open_backend
from keyswap.state.registry import Registration, address
from keyswap.state.store import audit_row, iso, new_request_id
from keyswap.state.writer import Writer

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

logger = logging.getLogger(__name__)

RECORDED = "keyswap.recorded"
_JSON_FIELDS = frozenset({"request_headers", "response_headers"})


class Recorder:
    """Turns each finished flow into an activity log row, written on the writer thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: Backend | None = None
        self.writer: Writer | None = None
        self.registration: Registration | None = None
        self.gateway_id: str | None = None  # the registry's id, on every row
        self._redaction = Redaction(None)
        self._redaction_for: tuple[LoadedConfig | None, tuple[frozenset[str], ...]] = (None, ())
        # Secrets issued at run time (OAuth2 tokens), masked like the config's.
        self.secret_sources: list[Callable[[], frozenset[str]]] = []
        self._previous_factory = logging.getLogRecordFactory()
        self.body_cap = 0
        self.live_view = False  # a UI (mitmweb, the console) shows flows while in flight

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "keyswap_log_bodies",
            int,
            0,
            "Store the first N bytes of buffered request and response bodies in the "
            "activity log, secrets masked (0: off).",
        )
        loader.add_option(
            "keyswap_log_retention_days",
            int,
            0,
            "Delete activity log rows older than this many days (0: keep everything).",
        )

    def configure(self, updated: set[str]) -> None:
        if "keyswap_log_bodies" in updated:
            self.body_cap = ctx.options.keyswap_log_bodies

    def running(self) -> None:
        self.live_view = ctx.master.addons.get("view") is not None
        if self.settings.source is None:
            return
        self._previous_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(self._masked_record)
        try:
            backend = self.backend = open_backend(self.settings.db_path())
            self.secret_sources.append(lambda: backend.secrets)
            before, after = migrations.upgrade(backend)
            registration = Registration(
                backend, self.settings.source.path, listeners(), self._served_digest
            )
            registration.start()
        except StateError as e:
            # An error logged at start-up makes mitmproxy exit 1.
            logger.error("keyswap: the state database cannot be used: %s", e)
            return
        if before != after:
            logger.info("keyswap: upgraded %s from schema %d to %d", backend.shown, before, after)
        self.registration, self.gateway_id = registration, registration.id
        self.writer = Writer(backend, ctx.options.keyswap_log_retention_days)
        self.settings.on_reload.append(self.audit_reload)
        logger.info("keyswap: activity log in %s, as gateway %s", backend.shown, registration.id)

    def backend_report(self) -> dict[str, Any]:
        """The state database's health, for /_keyswap/health."""
        if self.registration is None:
            return {"reachable": False, "error": "the state database is not open"}
        return self.registration.report()

    def _served_digest(self) -> str | None:
        loaded = self.settings.runtime.loaded
        return loaded.digest if loaded else None

    def _masked_record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        """Every log record, keyswap's or mitmproxy's (which quotes raw client bytes, such
        as a head cut short), as text with secrets and proxy tokens masked, bounded."""
        record = self._previous_factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left to logging's own error handling
            return record
        clean = shown(self.redaction().text(message))  # mask first: a cut token is no token
        if clean != message:
            record.msg, record.args = clean, None
        return record

    def done(self) -> None:
        if self.registration is not None:
            self.registration.stop()
        if self.writer is not None:
            self.writer.close()
            report = self.writer.report()
            logger.info(
                "keyswap: activity log closed: %d rows written, %d dropped, %d failed (%s)",
                report["rows_written"],
                report["rows_dropped"],
                report["write_failures"],
                report["db"],
            )
        if self.backend is not None:
            self.backend.close()
        if logging.getLogRecordFactory() == self._masked_record:
            logging.setLogRecordFactory(self._previous_factory)

    def report(self) -> dict[str, Any]:
        return self.writer.report() if self.writer else {}

    def audit_reload(self, loaded: LoadedConfig | None, errors: list[str]) -> None:
        if self.registration is not None:
            self.registration.refresh()  # the registry says at once what it serves now
        if self.writer is None:
            return
        path = str(self.settings.source.path if self.settings.source else "")
        if loaded is not None:
            detail: dict[str, Any] = {
                "digest": loaded.digest,
                "proxies": sorted(loaded.config.proxies),
            }
            self.writer.add("audit", audit_row("reload", path, detail, actor="gateway"))
        else:
            self.writer.add(
                "audit", audit_row("reload-failed", path, {"errors": errors}, actor="gateway")
            )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Every stage has decided; mitmweb adds the flow to its list after this hook.
        meta = flow.metadata
        if problem.DESTINATION not in meta and problem.FORWARD not in meta:
            show_gateway_url(flow)  # (forward mode's flows show where the client sent them)
        if self.live_view:
            proxy_id, code = meta.get(problem.PROXY), meta.get(problem.CODE)
            annotate(flow, proxy_id, code, meta.get(problem.MESSAGE))

    def response(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        # A tunnel keyswap does not look into is a row of its own; an intercepted
        # tunnel's requests are rows each, the CONNECT none.
        if flow.metadata.get(problem.PASSTHROUGH):
            self.record(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self.record(flow)  # a refused CONNECT

    def record(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        if meta.get(RECORDED) or self.writer is None:
            return
        meta[RECORDED] = True
        if PROBE in meta:
            return  # an answered health probe: counted by the health stage, not a row
        try:
            seen = self.capture(flow)
            row = seen.row()
        except Exception:
            logger.exception("keyswap: could not build the activity log row")
            return
        annotate(flow, seen.meta.get(problem.PROXY), seen.code, seen.message)
        self.writer.add("requests", row)

    def redaction(self) -> Redaction:
        loaded = self.settings.runtime.loaded
        issued = tuple(source() for source in self.secret_sources)  # replaced, not mutated
        cached_loaded, cached_issued = self._redaction_for
        if loaded is not cached_loaded or issued != cached_issued:
            extra = frozenset().union(*issued)
            self._redaction = Redaction(loaded.config if loaded else None, extra)
            self._redaction_for = (loaded, issued)
        return self._redaction

    def capture(self, flow: http.HTTPFlow) -> Captured:
        """What the row needs from a finished flow (`Captured.row` makes the row). Everything
        captured is immutable or a copy: the row says what the flow was when it ended."""
        redact = self.redaction()
        request, response, meta = flow.request, flow.response, flow.metadata
        error = meta.get(problem.ERROR) or (flow.error.msg if flow.error else None)
        # Both may quote what the client sent (an origin, a header name): masked, and
        # the message also goes on the flow (its comment) now.
        message = meta.get(problem.MESSAGE) or (problem.one_line(error) if error else None)
        config = self.settings.runtime.config if self.settings.runtime.loaded else None
        return Captured(
            redact=redact,
            meta=dict(meta),
            code=meta.get(problem.CODE) or (problem.PROXY_ERROR if error else None),
            message=shown(redact.text(message)) if message else None,
            error=error,
            environment=config.environment if config else None,
            region=config.region if config else None,
            peername=flow.client_conn.peername,
            method=request.method,
            path=meta.get(problem.PATH) or request.path,
            target_path=request.path,
            started=request.timestamp_start,
            ended=(response.timestamp_end if response else None) or time.time(),
            request_headers=fields.snapshot(request.headers),
            request_body=request.raw_content,
            status=response.status_code if response else None,
            response_headers=fields.snapshot(response.headers) if response else None,
            response_body=response.raw_content if response else None,
            body_cap=self.body_cap,
            mode="forward" if isinstance(flow.client_conn.proxy_mode, RegularMode) else "reverse",
            gateway=self.gateway_id,
        )

    def row(self, flow: http.HTTPFlow) -> dict[str, Any]:
        """The activity log row of a finished flow."""
        return self.capture(flow).row()


class Captured(NamedTuple):
    """A finished flow as the activity log needs it (see `Recorder.capture`)."""

    redact: Redaction
    meta: dict[str, Any]
    code: str | None
    message: str | None  # masked and shown
    error: str | None
    environment: str | None
    region: str | None
    peername: tuple[Any, ...] | None
    method: str
    path: str  # as the client sent it
    target_path: str  # as it went to the target
    started: float
    ended: float
    request_headers: http.Headers
    request_body: bytes | None
    status: int | None
    response_headers: http.Headers | None
    response_body: bytes | None
    body_cap: int
    mode: str  # the listener's: reverse, or forward (regular, intercepting)
    gateway: str | None  # the registry id of the process that served it

    def row(self) -> dict[str, Any]:
        """The `requests` row: every secret masked, every text value through the one
        place where client bytes become text, so that a byte that is not UTF-8 cannot fail
        the writer's batch and no field is unbounded. (The header documents are JSON,
        ASCII and bounded by construction.)"""
        redact, meta = self.redact, self.meta
        destination = meta.get(problem.DESTINATION)
        row: dict[str, Any] = {
            "id": meta.get(problem.REQUEST_ID) or new_request_id(),
            "started_at": iso(self.started),
            "duration_ms": round((self.ended - self.started) * 1000, 3),
            "proxy_id": meta.get(problem.PROXY),
            "token_id": meta.get(TOKEN_ID),
            "environment": self.environment,
            "region": self.region,
            "client_ip": self.peername[0] if self.peername else None,
            "method": self.method,
            "path": redact.url(self.path),
            "target": meta.get(problem.TARGET),
            "target_url": redact.url(target_url(destination, self.target_path))
            if destination
            else None,
            "status": self.status,
            "proxy_code": self.code,
            "message": self.message,
            "error": redact.text(self.error) if self.error else None,
            "upstream_proxy": meta.get(UPSTREAM),
            "bytes_in": _size(meta.get(problem.BYTES_IN), self.request_body),
            "bytes_out": _size(meta.get(problem.BYTES_OUT), self.response_body),
            "origin": redact.header(self.request_headers, b"origin"),
            "user_agent": redact.header(self.request_headers, b"user-agent"),
            "request_headers": redact.headers_json(self.request_headers),
            "response_headers": redact.headers_json(self.response_headers)
            if self.response_headers is not None
            else None,
            # an async request's attempt number (0 for its 202), else this flow's own
            "attempts": meta[problem.ASYNC_ATTEMPT]
            if problem.ASYNC_ATTEMPT in meta
            else meta.get(problem.ATTEMPTS, 1 if destination else 0),
            "async_id": meta.get(problem.ASYNC_ID),
            "mode": self.mode,
            "gateway": self.gateway,
        }
        cap = self.body_cap
        if cap > 0:
            row["request_body"] = _preview(self.request_body, cap, redact)
            row["response_body"] = _preview(self.response_body, cap, redact)
        return {
            k: shown(v) if type(v) is str and k not in _JSON_FIELDS else v for k, v in row.items()
        }


def listeners() -> list[dict[str, str]]:
    """Where this process listens, per mode, as the registry records it."""
    proxyserver: Any = ctx.master.addons.get("proxyserver")
    if proxyserver is None:
        return []
    return [
        {
            "mode": "forward" if isinstance(server.mode, RegularMode) else "reverse",
            "address": address(addr),
        }
        for server in proxyserver.servers
        for addr in server.listen_addrs
    ]


def target_url(destination: dict[str, Any], path: str) -> str:
    """Where the request went (the target, also when it went through a proxy)."""
    return origin_of(destination["scheme"], destination["host"], destination["port"]) + path


MARKERS = {problem.DENIED: ":no_entry:", problem.PROXY_ERROR: ":warning:"}


def annotate(
    flow: http.HTTPFlow, proxy_id: str | None, code: str | None, message: str | None
) -> None:
    """What keyswap decided, at a glance in mitmweb: `proxy · code` first, so that the
    comment column shows it, then why; refused and failed flows are marked."""
    flow.comment = f"{proxy_id or '-'} · {code or '-'} · {message or ''}"
    if marker := MARKERS.get(code or ""):
        flow.marked = marker


def show_gateway_url(flow: http.HTTPFlow) -> None:
    """A request that went to no target shows the gateway's own URL: the address the
    client connected to, not reverse mode's placeholder, which mitmproxy also wrote into
    its Host header before any addon saw it (so the client's own Host is gone)."""
    client = flow.client_conn
    host, port = client.sockname[0], client.sockname[1]
    scheme = "https" if client.tls else "http"
    request = flow.request
    data = request.data
    data.scheme, data.host, data.port = scheme.encode(), host, port
    request.host_header = authority(host, port, scheme)


def _size(counted: int | None, body: bytes | None) -> int | None:
    return counted if counted is not None else None if body is None else len(body)


def _preview(body: bytes | None, cap: int, redact: Redaction) -> str | None:
    if body is None:
        return None
    # Mask before cutting, so a secret straddling the cut cannot leave half of itself.
    longest = max((len(v) for v in redact.values), default=0)
    text = body[: 4 * (cap + longest)].decode("utf-8", "replace")
    return redact.text(text)[:cap]
