"""The activity log: one `requests` row per flow that reached the gateway, denied ones
included, written when the flow ends (`response` or `error`); answered health probes
are counted by the health stage instead. Secrets never reach a row: credential headers,
cookies and the config's credential header and query names are stored as `********`,
and body previews have every configured secret value masked.

Being last, it also says on each flow what keyswap decided, for mitmweb: the comment
(`proxy · code · message`, the flow list's comment column) and a marker on refused and
failed flows; and a flow that went to no target shows the gateway's own URL."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from keyswap.config.loader import LoadedConfig
from keyswap.config.secrets import Redaction
from keyswap.gateway import problem
from keyswap.gateway.stages.auth import TOKEN_ID
from keyswap.gateway.stages.health import PROBE
from keyswap.gateway.stages.upstream import UPSTREAM
from keyswap.net.text import shown
from keyswap.net.urls import authority, origin_of
from keyswap.state.store import audit_row, iso, new_request_id
from keyswap.state.writer import Writer

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings

logger = logging.getLogger(__name__)

RECORDED = "keyswap.recorded"
_JSON_FIELDS = frozenset({"request_headers", "response_headers"})


class Recorder:
    """Turns each finished flow into an activity log row, on the writer thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.writer: Writer | None = None
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
        self.writer = Writer(self.settings.db_path(), ctx.options.keyswap_log_retention_days)
        self.settings.on_reload.append(self.audit_reload)
        logger.info("keyswap: activity log in %s", self.writer.path)
        self.writer.add("gateways", self.announcement())
        self._previous_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(self._masked_record)

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

    def announcement(self) -> dict[str, Any]:
        """Where this gateway serves which config, so the command line can wait for it."""
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        addresses = proxyserver.listen_addrs() if proxyserver else []
        url = None
        if addresses:
            host, port = addresses[0][:2]
            host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        assert self.settings.source is not None
        return {
            "pid": os.getpid(),
            "config": str(self.settings.source.path.resolve()),
            "url": url,
            "started_at": iso(time.time()),
        }

    def done(self) -> None:
        if logging.getLogRecordFactory() == self._masked_record:
            logging.setLogRecordFactory(self._previous_factory)
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

    def report(self) -> dict[str, Any]:
        return self.writer.report() if self.writer else {}

    def audit_reload(self, loaded: LoadedConfig | None, errors: list[str]) -> None:
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
        if problem.DESTINATION not in meta:
            show_gateway_url(flow)
        if self.live_view:
            proxy_id, code = meta.get(problem.PROXY), meta.get(problem.CODE)
            annotate(flow, proxy_id, code, meta.get(problem.MESSAGE))

    def response(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def record(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        if meta.get(RECORDED) or self.writer is None:
            return
        meta[RECORDED] = True
        if PROBE in meta:
            return  # an answered health probe: counted by the health stage, not a row
        try:
            row = self.row(flow)
        except Exception:
            logger.exception("keyswap: could not build the activity log row")
            return
        annotate(flow, row["proxy_id"], row["proxy_code"], row["message"])
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

    def row(self, flow: http.HTTPFlow) -> dict[str, Any]:
        redact = self.redaction()
        request, response, meta = flow.request, flow.response, flow.metadata
        end = (response.timestamp_end if response else None) or time.time()
        config = self.settings.runtime.config if self.settings.runtime.loaded else None
        error = meta.get(problem.ERROR) or (flow.error.msg if flow.error else None)
        code = meta.get(problem.CODE) or (problem.PROXY_ERROR if error else None)
        # Both may quote what the client sent (an origin, a header name): masked like
        # every other field.
        message = meta.get(problem.MESSAGE) or (problem.one_line(error) if error else None)
        row: dict[str, Any] = {
            "id": meta.get(problem.REQUEST_ID) or new_request_id(),
            "started_at": iso(request.timestamp_start),
            "duration_ms": round((end - request.timestamp_start) * 1000, 3),
            "proxy_id": meta.get(problem.PROXY),
            "token_id": meta.get(TOKEN_ID),
            "environment": config.environment if config else None,
            "region": config.region if config else None,
            "client_ip": flow.client_conn.peername[0] if flow.client_conn.peername else None,
            "method": request.method,
            "path": redact.url(meta.get(problem.PATH) or request.path),
            "target": meta.get(problem.TARGET),
            "target_url": redact.url(target_url(flow)) if problem.DESTINATION in meta else None,
            "status": response.status_code if response else None,
            "proxy_code": code,
            "message": redact.text(message) if message else None,
            "error": redact.text(error) if error else None,
            "upstream_proxy": meta.get(UPSTREAM),
            "bytes_in": _size(meta.get(problem.BYTES_IN), request),
            "bytes_out": _size(meta.get(problem.BYTES_OUT), response),
            "origin": redact.header(request.headers, b"origin"),
            "user_agent": redact.header(request.headers, b"user-agent"),
            "request_headers": redact.headers_json(request.headers),
            "response_headers": redact.headers_json(response.headers) if response else None,
            "attempts": meta.get(problem.ATTEMPTS, 1 if problem.DESTINATION in meta else 0),
            "async_id": None,
        }
        cap = self.body_cap
        if cap > 0:
            row["request_body"] = _preview(request, cap, redact)
            row["response_body"] = _preview(response, cap, redact) if response else None
        # Every text value through the one place where client bytes become text: a byte
        # that is not UTF-8 cannot fail the writer's batch, and no field is unbounded.
        # (The header documents are JSON, ASCII and bounded by construction.)
        return {
            k: shown(v) if type(v) is str and k not in _JSON_FIELDS else v for k, v in row.items()
        }


def target_url(flow: http.HTTPFlow) -> str:
    """Where the request went (the target, also when it went through a proxy)."""
    dest = flow.metadata[problem.DESTINATION]
    return origin_of(dest["scheme"], dest["host"], dest["port"]) + flow.request.path


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


def _size(counted: int | None, message: http.Message | None) -> int | None:
    if counted is not None:
        return counted
    if message is None or message.raw_content is None:
        return None
    return len(message.raw_content)


def _preview(message: http.Message, cap: int, redact: Redaction) -> str | None:
    if message.raw_content is None:
        return None
    # Mask before cutting, so a secret straddling the cut cannot leave half of itself.
    longest = max((len(v) for v in redact.values), default=0)
    text = message.raw_content[: 4 * (cap + longest)].decode("utf-8", "replace")
    return redact.text(text)[:cap]
