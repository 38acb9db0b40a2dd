"""OAuth2 target credentials: fetch, cache, refresh before expiry, and refresh once
when the target answers a `refresh_on` status, then retry the request once.

Tokens are cached in the state database, encrypted with a key derived from the
credential's client secret (which lives only in the environment), so the database never
holds a usable token. A rotated refresh token is persisted before it is used. One
refresh per credential is in flight at a time; everyone waiting reuses its result. A
token endpoint error is recorded and not hammered: `invalid_grant` and the other client
errors stop refreshing until the config changes, anything else waits `RETRY_AFTER_S`."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import httpx
from mitmproxy import http

from keyswap.config.model import BasicProxyAuth, Config, OAuth2Credential, Target
from keyswap.gateway import problem, wire
from keyswap.net.urls import origin_of
from keyswap.state.backends import StateError
from keyswap.state.oauth2_tokens import TokenState, TokenStore
from keyswap.state.store import iso, new_request_id, now_iso

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings
    from keyswap.state.writer import Writer

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 30.0
# A refresh holds its credential's lease for the token request's timeout and this margin;
# a gateway waiting for another's refresh looks at the stored state this often.
LEASE_MARGIN_S = 5.0
LEASE_POLL_S = 0.05
DEFAULT_TIMEOUT_S = 30.0
TERMINAL_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})
OAUTH2 = "keyswap.oauth2"
RETRY = "keyswap.oauth2_retry"
REFRESHED = "keyswap.oauth2_refreshed"


class TokenError(Exception):
    """The token endpoint did not hand out a token; `code` is its error code."""

    def __init__(self, code: str, status: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.status = status


def token_request(
    credential: OAuth2Credential, refresh_token: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and headers of a token request (RFC 6749 4.4 / 6)."""
    form: dict[str, str] = {"grant_type": credential.grant}
    if credential.grant == "refresh_token":
        form["refresh_token"] = refresh_token or ""
    if credential.scope:
        form["scope"] = credential.scope
    if credential.audience:
        form["audience"] = credential.audience
    form.update(credential.extra)
    headers = {"accept": "application/json"}
    secret = credential.client_secret.get_secret_value()
    if credential.client_auth == "basic":
        pair = f"{credential.client_id}:{secret}".encode()
        headers["authorization"] = "Basic " + base64.b64encode(pair).decode()
    else:
        form["client_id"] = credential.client_id
        form["client_secret"] = secret
    return form, headers


def parse_token_response(status: int, body: bytes) -> tuple[str, float, str | None]:
    """(access token, lifetime in seconds, rotated refresh token) or `TokenError`."""
    try:
        data = json.loads(body)
    except ValueError:
        raise TokenError("invalid_response", status) from None
    if not isinstance(data, dict):
        raise TokenError("invalid_response", status)
    if status != 200 or "error" in data:
        raise TokenError(str(data.get("error") or f"http_{status}"), status)
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError("invalid_response", status)
    try:
        lifetime = float(data.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    rotated = data.get("refresh_token")
    return token, lifetime, rotated if isinstance(rotated, str) and rotated else None


def http_client(config: Config, target: Target | None) -> httpx.AsyncClient:
    """An HTTP client that reaches what `target` reaches: through its upstream proxy,
    trusting its CA. Used for token requests and the one retry."""
    verify: ssl.SSLContext | bool = True
    if target is not None:
        verify = ssl.create_default_context(cafile=target.tls.ca_file)
        if not target.tls.verify:
            verify.check_hostname = False
            verify.verify_mode = ssl.CERT_NONE
        if target.tls.client_cert:
            verify.load_cert_chain(target.tls.client_cert)
    proxy = None
    name = target.upstream_proxy if target else None
    if name:
        up = config.upstream_proxies[name]
        auth = None
        if isinstance(up.auth, BasicProxyAuth):
            auth = (up.auth.user, up.auth.password.get_secret_value())
        context = ssl.create_default_context(cafile=up.tls.ca_file) if up.type == "https" else None
        proxy = httpx.Proxy(f"{up.type}://{up.host}:{up.port}", auth=auth, ssl_context=context)
    return httpx.AsyncClient(
        verify=verify, proxy=proxy, trust_env=False, timeout=target.timeout_s if target else 30
    )


class OAuth2:
    """Puts a valid access token on requests to oauth2 targets, and retries once after
    a refresh when the target says the token is no longer good."""

    def __init__(self, settings: Settings, writer: Any, retry_pipeline: list[Any]) -> None:
        self.settings = settings
        self._writer_owner = writer  # the Recorder: its writer exists once running
        self.retry_pipeline = retry_pipeline  # addons whose responseheaders re-run on a retry
        self.states: dict[str, TokenState] = {}
        self._used: dict[str, str] = {}  # flow id -> the access token it was sent with
        self.store: TokenStore | None = None
        # Who holds a credential's refresh lease: unique per process and node.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.issued: frozenset[str] = frozenset()  # the tokens held now, for masking

    # --- lifecycle ------------------------------------------------------------------

    def running(self) -> None:
        if self.settings.source is None:
            return
        self.store = TokenStore(self.settings.db_path())
        self.states.update(self.store.load(self.settings.runtime.config))
        self._note_issued()

    def _note_issued(self) -> None:
        self.issued = frozenset(
            t for s in self.states.values() for t in (s.access_token, s.refresh_token) if t
        )

    def done(self) -> None:
        if self.store is not None:
            self.store.close()

    def report(self) -> dict[str, Any]:
        return {name: state.public() for name, state in self.states.items()}

    @property
    def writer(self) -> Writer | None:
        return getattr(self._writer_owner, "writer", None)

    # --- the request ------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Synchronous unless the target really has an oauth2 credential: most requests
        # must not pay for a coroutine.
        if flow.response or flow.error or not flow.live or problem.TARGET not in flow.metadata:
            return None
        config = self.settings.runtime.config
        name = config.targets[flow.metadata[problem.TARGET]].credential
        credential = config.credentials[name]
        if not isinstance(credential, OAuth2Credential):
            return None
        return self._authorize(flow, name, credential)

    async def _authorize(
        self, flow: http.HTTPFlow, name: str, credential: OAuth2Credential
    ) -> None:
        token = await self.token(name, credential, flow.metadata[problem.REQUEST_ID])
        if flow.response or not flow.live:
            return
        if token is None:
            state = self.states.get(name)
            why = state.error if state and state.error else "no token"
            problem.deny(
                flow,
                502,
                "credential",
                f"oauth2 credential '{name}' has no valid token: {why}",
            )
            return
        wire.put_header(flow, b"authorization", f"Bearer {token}".encode())
        flow.metadata[OAUTH2] = name
        self._used[flow.id] = token

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        name = flow.metadata.get(OAUTH2)
        response = flow.response
        if name is None or response is None or flow.metadata.get(REFRESHED):
            return
        credential = self.settings.runtime.config.credentials.get(name)
        if (
            isinstance(credential, OAuth2Credential)
            and response.status_code in credential.refresh_on
        ):
            response.stream = False  # the original answer is kept, in case the retry cannot happen
            flow.metadata[RETRY] = True

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        used = self._used.pop(flow.id, None)
        if not flow.metadata.pop(RETRY, False) or used is None:
            return None
        return self._refresh_and_retry(flow, used)

    async def _refresh_and_retry(self, flow: http.HTTPFlow, used: str) -> None:
        name = flow.metadata[OAUTH2]
        if problem.BYTES_IN in flow.metadata:
            logger.info(
                "keyswap: %s: body was streamed, cannot retry after refresh",
                flow.metadata[problem.REQUEST_ID],
            )
            return
        credential = self.settings.runtime.config.credentials.get(name)
        if not isinstance(credential, OAuth2Credential):
            return
        token = await self.refreshed_after(
            name, credential, used, flow.metadata[problem.REQUEST_ID]
        )
        if token is None:
            return  # the client gets the target's original response
        await self.retry(flow, token)

    def error(self, flow: http.HTTPFlow) -> None:
        self._used.pop(flow.id, None)

    async def retry(self, flow: http.HTTPFlow, token: str) -> None:
        config = self.settings.runtime.config
        target = config.targets[flow.metadata[problem.TARGET]]
        dest = flow.metadata[problem.DESTINATION]
        headers = [
            (k, v)
            for k, v in flow.request.headers.items(multi=True)
            if k.lower() not in ("proxy-authorization", "host", "content-length")
        ]
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"] + [
            ("authorization", f"Bearer {token}")
        ]
        url = origin_of(dest["scheme"], dest["host"], dest["port"]) + flow.request.path
        try:
            async with http_client(config, target) as client:
                request = client.build_request(
                    flow.request.method,
                    url,
                    headers=headers,
                    content=flow.request.raw_content or b"",
                )
                answer = await client.send(request, stream=True)
                body = b"".join([chunk async for chunk in answer.aiter_raw()])
                await answer.aclose()
        except httpx.HTTPError as e:
            logger.warning(
                "keyswap: %s: retry after refresh failed: %s", flow.metadata[problem.REQUEST_ID], e
            )
            return
        # the retry pipeline (HeaderFilter, Cors) filters it like any forwarded answer
        flow.response = http.Response.make(answer.status_code, body, list(answer.headers.raw))
        flow.metadata[problem.ATTEMPTS] = 2
        flow.metadata[REFRESHED] = True
        target_id = flow.metadata[problem.TARGET]
        problem.decide(
            flow,
            problem.GRANTED,
            f"forwarded to target '{target_id}' (retried after an oauth2 refresh)",
        )
        for addon in self.retry_pipeline:
            addon.responseheaders(flow)

    # --- tokens ------------------------------------------------------------------------

    async def token(self, name: str, credential: OAuth2Credential, cause: str) -> str | None:
        """A valid access token, refreshing first when it is (nearly) expired."""
        state = self.states.setdefault(name, TokenState())
        if self._fresh(state, credential):
            return state.access_token
        async with state.lock:
            if self._fresh(state, credential):
                return state.access_token
            return await self._obtain(name, credential, state, cause, None)

    async def refreshed_after(
        self, name: str, credential: OAuth2Credential, stale: str, cause: str
    ) -> str | None:
        """A token other than `stale`: the one a concurrent refresh got, or a new one."""
        state = self.states.setdefault(name, TokenState())
        async with state.lock:
            if self._usable(state, credential, stale):
                return state.access_token
            return await self._obtain(name, credential, state, cause, stale)

    def _fresh(self, state: TokenState, credential: OAuth2Credential) -> bool:
        return (
            bool(state.access_token) and time.time() < state.expires_at - credential.refresh_skew_s
        )

    def _usable(self, state: TokenState, credential: OAuth2Credential, stale: str | None) -> bool:
        return self._fresh(state, credential) and state.access_token != stale

    async def _obtain(
        self,
        name: str,
        credential: OAuth2Credential,
        state: TokenState,
        cause: str,
        stale: str | None,
    ) -> str | None:
        """A token for every process sharing the state database, with one refresh at a
        time among them: the newest stored token when it is usable (another process got
        it), else a refresh by whoever holds the credential's lease; the others wait for
        its result and use it. Without the database (it cannot be reached) no refresh is
        made: a refresh it could not record would spend the refresh token for nobody."""
        if self.store is None:
            return await self._refresh(name, credential, state, cause, None)
        lease_s = self._lease_s(name)
        deadline = time.monotonic() + 2 * lease_s
        try:
            while True:
                stored = await self.store.read(name, credential)
                self._adopt(state, stored)
                if self._usable(state, credential, stale):
                    return state.access_token
                if self._holding_back(state, credential):
                    return None
                lease = await self.store.take_lease(name, credential, self.owner, lease_s)
                if lease is not None:
                    self._adopt(state, lease)
                    if self._usable(state, credential, stale):
                        await self.store.release(name, self.owner)
                        return state.access_token
                    return await self._refresh(name, credential, state, cause, lease.version)
                if time.monotonic() > deadline:
                    raise StateError("another gateway holds the refresh and does not finish")
                await asyncio.sleep(LEASE_POLL_S)  # another process is refreshing
        except StateError as e:
            state.error, state.error_at = "token state unavailable", time.time()
            logger.error("keyswap: oauth2 credential '%s': no refresh: %s", name, e)
            return None

    def _lease_s(self, name: str) -> float:
        """How long a refresh may hold the credential: the token request's timeout, and
        a margin for committing its result."""
        target = self._target_of(name)
        return (target.timeout_s if target else DEFAULT_TIMEOUT_S) + LEASE_MARGIN_S

    def _target_of(self, name: str) -> Target | None:
        """A target using credential `name`: its upstream proxy, TLS settings and timeout
        are the ones the token request uses."""
        config = self.settings.runtime.config
        return next((t for t in config.targets.values() if t.credential == name), None)

    def _adopt(self, state: TokenState, stored: TokenState | None) -> None:
        """Take what the database holds when it is newer than what this process has."""
        if stored is not None and stored.version > state.version:
            state.adopt(stored)
            self._note_issued()

    def _holding_back(self, state: TokenState, credential: OAuth2Credential) -> bool:
        """Whether refreshing now is pointless: the credential's refresh token was
        refused (until the config gives a new one), or the token endpoint failed a moment
        ago (it is not hammered)."""
        config_refresh = _config_refresh(credential)
        if state.config_refresh != config_refresh:
            return False  # the config has a new refresh token: start over from it
        return state.terminal or bool(state.error and time.time() - state.error_at < RETRY_AFTER_S)

    async def _refresh(
        self,
        name: str,
        credential: OAuth2Credential,
        state: TokenState,
        cause: str,
        version: int | None,
    ) -> str | None:
        """Call the token endpoint (holding the lease on `version` of the stored state,
        when there is a database) and commit what it answered, compare-and-swap on that
        version: a refresh that stalled past its lease cannot overwrite a newer token."""
        config_refresh = _config_refresh(credential)
        if state.config_refresh != config_refresh:
            # The config has a new refresh token: start over from it.
            state.refresh_token, state.config_refresh = None, config_refresh
            state.error, state.terminal = None, False
        if version is None and self._holding_back(state, credential):
            return None
        started = time.time()
        status: int | None = None
        result = TokenState(
            refresh_token=state.refresh_token,
            config_refresh=config_refresh,
            refreshed_at=state.refreshed_at,
        )
        try:
            token, lifetime, rotated, status = await self._call(
                name, credential, state.refresh_token or config_refresh
            )
        except TokenError as e:
            status = e.status
            result.error, result.error_at = e.code, time.time()
            result.terminal = e.code in TERMINAL_ERRORS
            result.access_token, result.expires_at = state.access_token, state.expires_at
        else:
            result.access_token, result.expires_at = token, time.time() + lifetime
            result.refresh_token = rotated or state.refresh_token
            result.refreshed_at = now_iso()
        # Committed before use: a restart, or another gateway, must never present a
        # spent refresh token.
        kept = await self._commit(name, credential, state, result, version)
        self._log_refresh(name, credential, cause, started, status, result.error)
        if kept is not result:
            logger.info(
                "keyswap: oauth2 credential '%s': another gateway refreshed meanwhile; using its"
                " token",
                name,
            )
        elif result.error:
            logger.error(
                "keyswap: oauth2 credential '%s': token endpoint answered %s%s",
                name,
                result.error,
                " (terminal: fix the credential in the config)"
                if result.terminal
                else f" (retrying after {RETRY_AFTER_S:.0f} s)",
            )
        return state.access_token if self._usable(state, credential, None) else None

    async def _commit(
        self,
        name: str,
        credential: OAuth2Credential,
        state: TokenState,
        result: TokenState,
        version: int | None,
    ) -> TokenState:
        """Make `result` this process's state and the stored one; what is kept is
        `result`, or the newer token another gateway stored meanwhile."""
        if self.store is None or version is None:
            state.adopt(result, version=state.version)
            self._note_issued()
            return result
        try:
            committed = await self.store.commit(name, credential, result, version)
            if committed is None:
                # The lease ran out and another gateway stored a state meanwhile. A token
                # of theirs wins; ours wins over their error (the refresh token they were
                # refused is the one this refresh spent).
                stored = await self.store.read(name, credential)
                if stored is None or (stored.access_token and not stored.error) or result.error:
                    self._adopt(state, stored)
                    return stored or result
                committed = await self.store.commit(name, credential, result, stored.version)
                if committed is None:
                    raise StateError("the stored token state changed twice during one refresh")
            state.adopt(result, version=committed)
        except StateError as e:
            # The endpoint has already spent the old refresh token: the new one is used
            # here, but a restart or another gateway would present a spent one.
            logger.error("keyswap: oauth2 credential '%s': token state NOT saved: %s", name, e)
            state.adopt(result, version=state.version)
        self._note_issued()
        return result

    async def _call(
        self, name: str, credential: OAuth2Credential, refresh: str | None
    ) -> tuple[str, float, str | None, int]:
        config = self.settings.runtime.config
        target = self._target_of(name)
        form, headers = token_request(credential, refresh)
        try:
            async with http_client(config, target) as client:
                answer = await client.post(credential.token_url, data=form, headers=headers)
        except httpx.HTTPError as e:
            raise TokenError(f"unreachable: {type(e).__name__}") from None
        token, lifetime, rotated = parse_token_response(answer.status_code, answer.content)
        return token, lifetime, rotated, answer.status_code

    def _log_refresh(
        self,
        name: str,
        credential: OAuth2Credential,
        cause: str,
        started: float,
        status: int | None,
        error: str | None,
    ) -> None:
        """The refresh as its own activity log row (no token in it)."""
        if self.writer is None:
            return
        self.writer.add(
            "requests",
            {
                "id": new_request_id(),
                "started_at": iso(started),
                "duration_ms": round((time.time() - started) * 1000, 3),
                "method": "POST",
                "target_url": credential.token_url,
                "status": status,
                "proxy_code": problem.PROXY_ERROR if error else problem.GRANTED,
                "message": f"oauth2 token refresh for credential '{name}' (for request {cause})",
                "error": error,
                "attempts": 1,
            },
        )


def _config_refresh(credential: OAuth2Credential) -> str | None:
    """The refresh token the config gives (a stored state grown from another is stale)."""
    return credential.refresh_token.get_secret_value() if credential.refresh_token else None
