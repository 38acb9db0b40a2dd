"""The async queue's side of a gateway: the state calls of the async stages (on threads
of their own, never on the event loop), and the delivery loop, which leases due requests
from the state database, sends each through the pipeline (keyswap.gateway.delivery),
and writes what the attempt ended in (keyswap.gateway.retry_policy decides what
follows). Every gateway on the database delivers; a lease gives each attempt to one.

On shutdown it stops leasing and lets its attempts in flight end (as the drain lets
requests end); an attempt cut by a crash is taken again by any gateway once its lease
runs out or its gateway leaves the registry's live list."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from keyswap.config import tokens
from keyswap.config.secrets import Redaction
from keyswap.gateway import delivery, problem, retry_policy
from keyswap.state import async_queue
from keyswap.state.async_queue import Job, Outcome
from keyswap.state.backends import Session, StateError
from keyswap.state.registry import LIVE_WITHIN_S
from keyswap.state.store import iso, unix

if TYPE_CHECKING:
    from keyswap.gateway.settings import Settings
    from keyswap.gateway.stages.recorder import Recorder

logger = logging.getLogger(__name__)

T = TypeVar("T")
THREADS = 2
# How long a lease outlasts the longest an attempt may take (the target's connect and
# response timeouts): time to write the outcome.
LEASE_MARGIN_S = 15.0
PRUNE_EVERY_S = 300.0
# Abandoned attempts and deadlines are looked for this often, not on every lease: a
# lease reads due requests from an index, a sweep reads every request in delivery.
SWEEP_EVERY_S = 1.0
FIGURES_EVERY_S = 2.0
# How long shutdown waits for the delivery loop's round in progress (a state call may
# wait for SQLite's busy timeout).
LOOP_STOP_S = 15.0
LOG_EVERY_S = 10.0


class Deliveries:
    """Runs the async queue's state calls and delivers due requests."""

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder
        self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="keyswap-async")
        self._loop_task: asyncio.Task[None] | None = None
        self._attempts: dict[asyncio.Task[None], str] = {}  # attempts in flight: their proxy
        self._wake = asyncio.Event()
        self._stopping = False
        self._figures: dict[str, Any] = {}
        self._figures_at = 0.0
        # Requests not yet done, by proxy, as of the last look (plus those accepted here
        # since): what the queue bound and the fair share of the slots are judged by.
        self.backlog: dict[str, int] = {}
        self._next_prune = 0.0
        self._next_sweep = 0.0
        self._last_log = -LOG_EVERY_S
        self.attempts_made = 0  # attempts this process made

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "keyswap_async_concurrency",
            int,
            16,
            "Async requests this gateway delivers at once.",
        )
        loader.add_option(
            "keyswap_async_max_queued",
            int,
            10000,
            "Async requests of one proxy not yet delivered, at most: past it, new ones are "
            "refused 503 (the queue is full) until it drains.",
        )
        loader.add_option(
            "keyswap_async_poll_ms",
            int,
            1000,
            "How often an idle gateway looks for due async requests (a request accepted "
            "by this gateway starts at once).",
        )
        loader.add_option(
            "keyswap_async_retention_s",
            int,
            7 * 86400,
            "How long a finished async request and its result are kept, in seconds.",
        )

    def running(self) -> None:
        if self.settings.source is not None:
            # A task: its first step runs after every stage's `running`, the recorder's
            # (which opens and upgrades the database) included.
            self._loop_task = asyncio.get_running_loop().create_task(self._deliver_forever())

    async def done(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            # Not cancelled: a lease being taken on a thread would commit with nobody to
            # deliver it. The loop sees `_stopping` and ends after its round.
            _, pending = await asyncio.wait({self._loop_task}, timeout=LOOP_STOP_S)
            for task in pending:
                task.cancel()
        if self._attempts:
            logger.info(
                "keyswap: shutting down, %d async deliveries in flight", len(self._attempts)
            )
            await asyncio.wait(set(self._attempts), timeout=ctx.options.keyswap_drain_s)
        # The threads stay: until the drain (next) stops the listeners, requests are
        # still accepted and stored through them.

    # -- state calls, off the event loop --------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(session, *args, **kwargs)` on one of this stage's threads."""

        def run() -> T:
            backend = self.recorder.backend
            if backend is None or self.recorder.gateway_id is None:
                raise StateError("the state database is not open")
            with backend.session() as session:
                return fn(session, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def wake(self) -> None:
        """A request was accepted here: look for due requests now."""
        self._wake.set()

    def full(self, proxy_id: str) -> bool:
        """Whether the proxy's queue is at its bound (`keyswap_async_max_queued`)."""
        bound: int = ctx.options.keyswap_async_max_queued
        return self.backlog.get(proxy_id, 0) >= bound

    def accepted(self, proxy_id: str) -> None:
        """Count a request accepted here until the next look at the database."""
        self.backlog[proxy_id] = self.backlog.get(proxy_id, 0) + 1
        self.wake()

    # -- the delivery loop ----------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while not self._stopping:
            full = False
            try:
                full = await self._round()
            except StateError as e:
                self._log_failure(e)
            except Exception:
                logger.exception("keyswap: the async delivery loop failed; it goes on")
            if full:
                await asyncio.sleep(0)  # more may be due: lease again once a slot frees
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ctx.options.keyswap_async_poll_ms / 1000)

    async def _round(self) -> bool:
        """Lease what fits and start delivering it; True when every slot was filled (so
        more may be waiting)."""
        if self.recorder.gateway_id is None:
            return False
        now = time.time()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            before = iso(now - ctx.options.keyswap_async_retention_s)
            await self.call(async_queue.prune, before)
        if now - self._figures_at >= FIGURES_EVERY_S:
            self._figures_at = now
            self._figures = await self.call(async_queue.figures, iso(now), iso(now - 3600))
            self.backlog = await self.call(async_queue.backlog)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY_S
            await self.call(async_queue.sweep, iso(now), iso(now - LIVE_WITHIN_S))
        concurrency: int = ctx.options.keyswap_async_concurrency
        free = concurrency - len(self._attempts)
        if free <= 0 or self._stopping:
            return False
        proxies, limit = self._deliverable(free)
        lease_s = self._lease_s()
        owner = self.recorder.gateway_id
        leased_at, jobs = await self.call(_lease, owner, lease_s, limit, proxies)
        for job in jobs:  # started even when stopping: shutdown waits for them
            # The attempt ends before its lease does, whatever the wait to start it.
            limit_s = leased_at + lease_s - LEASE_MARGIN_S - time.time()
            task = asyncio.get_running_loop().create_task(self._attempt(job, limit_s))
            self._attempts[task] = job.proxy_id
            task.add_done_callback(self._attempts.pop)
            task.add_done_callback(self._slot_freed)
        return bool(len(jobs) == limit)

    def _slot_freed(self, _: object) -> None:
        """Lease again once a quarter of the slots is free: a lease per finished attempt
        would cost a transaction each."""
        concurrency: int = ctx.options.keyswap_async_concurrency
        if concurrency - len(self._attempts) >= max(1, concurrency // 4):
            self._wake.set()

    def _served_active(self) -> set[str]:
        """The proxies this gateway serves (another gateway on the database may serve
        another environment or region) and that are active (a disabled proxy's requests
        wait, queued, until it is enabled again or they expire)."""
        runtime = self.settings.runtime
        if runtime.loaded is None:
            return set()
        proxies = runtime.config.proxies
        return {p for p in runtime.served if proxies[p].active}

    def _deliverable(self, free: int) -> tuple[list[str], int]:
        """Whose requests to lease now, and how many. A fair share: while several
        proxies have requests waiting, one proxy's backlog (a slow target, thousands
        queued) holds at most half of the slots, and a lease takes at most that many."""
        deliverable = self._served_active()
        waiting = {p for p, n in self.backlog.items() if n and p in deliverable}
        if len(waiting) < 2:
            return sorted(deliverable), free
        share = max(1, ctx.options.keyswap_async_concurrency // 2)
        in_flight = Counter(self._attempts.values())
        deliverable = {p for p in deliverable if in_flight[p] < share}
        return sorted(deliverable), min(free, share)

    def _lease_s(self) -> float:
        """Longer than any attempt may take: the slowest target's timeouts, and time to
        write the outcome."""
        targets = (
            self.settings.runtime.config.targets.values() if self.settings.runtime.loaded else ()
        )
        longest = max((t.connect_timeout_s + t.timeout_s for t in targets), default=30.0)
        return longest + LEASE_MARGIN_S

    async def _attempt(self, job: Job, limit_s: float) -> None:
        """One attempt, and its outcome written (unless the lease was lost meanwhile)."""
        # Kept: the bound, and as many bytes more as the longest secret or a token, so
        # that one the bound cuts is still whole when the masking looks for it.
        keep = self.settings.runtime.config.limits.max_async_body_bytes
        keep += max(self.recorder.redaction().longest, tokens.LENGTH)
        try:
            attempt = await delivery.run(job, ctx.options, keep, max(1.0, limit_s))
            self.attempts_made += 1
            try:
                outcome = self.outcome(job, attempt, time.time())
            except Exception:
                logger.exception("keyswap: judging async request %s's answer failed", job.id)
                outcome = self._retry(job, "keyswap could not judge the answer", None, time.time())
            request_id = attempt.flow.metadata.get(problem.REQUEST_ID, "")
            owner = self.recorder.gateway_id or ""
            kept = await self._finish(job, owner, request_id, outcome)
        except StateError as e:
            self._log_failure(e)
            return
        except Exception:
            logger.exception("keyswap: delivering async request %s failed", job.id)
            return
        if kept and outcome.state == "queued" and outcome.next_attempt_at:
            # Due again then: look for it at that moment, not at the next poll.
            wait = unix(outcome.next_attempt_at) - time.time()
            asyncio.get_running_loop().call_later(max(0.0, wait), self._wake.set)
        if not kept:
            logger.warning(
                "keyswap: async request %s attempt %d: another gateway took it over"
                " (its lease ran out); this attempt's outcome is not kept",
                job.id,
                job.attempt,
            )

    async def _finish(self, job: Job, owner: str, request_id: str, outcome: Outcome) -> bool:
        """Write the outcome; a database that fails for a moment is tried again (a lost
        outcome would make the sweep call a delivered request abandoned)."""
        for delay in (0.5, 1.0, 2.0, 4.0):
            try:
                return await self.call(
                    async_queue.finish, job, owner, iso(time.time()), request_id, outcome
                )
            except StateError as e:
                self._log_failure(e)
                await asyncio.sleep(delay)
        return await self.call(
            async_queue.finish, job, owner, iso(time.time()), request_id, outcome
        )

    def outcome(self, job: Job, attempt: delivery.Attempt, now: float) -> Outcome:
        """What the attempt ended in, secrets masked."""
        flow = attempt.flow
        meta = flow.metadata
        response = flow.response
        code = meta.get(problem.CODE)
        gateway_made = bool(meta.get(problem.ANSWERED)) or code == problem.PROXY_ERROR
        redact = self.recorder.redaction()
        error = meta.get(problem.ERROR) or (flow.error.msg if flow.error else None)
        # An answer that broke off, or that the attempt's time limit cut, is no answer:
        # the call may not have been handled; it is tried again.
        if response is not None and (attempt.cut or flow.error is not None):
            reason = redact.text(f"the target's answer broke off: {error or 'cut'}")
            return self._retry(job, reason, None, now)
        status = response.status_code if response is not None else None
        kept: dict[str, Any] = {}
        if response is not None and not gateway_made:
            kept = self._response(attempt, response, redact)
        verdict = retry_policy.verdict(status, gateway_made, code)
        if verdict == "done":
            return Outcome("succeeded", **kept)
        reason = meta.get(problem.MESSAGE) or error or "the attempt failed"
        if not gateway_made and status is not None:
            reason = f"the target answered {status}"
        reason = redact.text(str(reason))
        if verdict == "refused" and job.proxy_id in self._served_active():
            return Outcome("failed", error=reason, **kept)
        # Refused because the proxy was disabled (or is no longer served here) while
        # the attempt was on its way: paused, not failed; tried again after the backoff.
        wait = retry_policy.retry_after_s(
            response.headers.get("retry-after") if response is not None else None, now
        )
        return self._retry(job, reason, wait, now, **kept)

    def _retry(
        self, job: Job, reason: str, retry_after: float | None, now: float, **kept: Any
    ) -> Outcome:
        """A failed attempt: queued again after the backoff, or the end (failed, expired)."""
        deadline = unix(job.deadline_at)
        after = retry_policy.after_failure(
            job.attempt, job.max_attempts, deadline, now, retry_after
        )
        return Outcome(
            after.state,
            next_attempt_at=iso(after.at) if after.at is not None else None,
            error=reason,
            **kept,
        )

    def _response(
        self, attempt: delivery.Attempt, response: http.Response, redact: Redaction
    ) -> dict[str, Any]:
        """The target's answer as stored: headers and the body's first bytes (up to the
        configured bound), every secret masked, and masked before the cut. A compressed
        body is stored decoded (the masking must see its text); one that cannot be
        decoded here (streamed, or broken) is not stored."""
        limit = self.settings.runtime.config.limits.max_async_body_bytes
        fields = list(response.headers.fields)
        if attempt.streamed is not None:
            body, whole = bytes(attempt.kept), attempt.streamed
        else:
            body = response.raw_content or b""
            whole = len(body)
        encoded = response.headers.get("content-encoding", "identity").strip().lower()
        if encoded not in ("", "identity"):
            decoded = None
            if attempt.streamed is None:
                with contextlib.suppress(ValueError):
                    decoded = response.get_content(strict=True)
            body, whole = (decoded, len(decoded)) if decoded is not None else (b"", whole)
            drop = (b"content-encoding", b"content-length")
            fields = [(k, v) for k, v in fields if k.lower() not in drop]
        stored = redact.cut(body, limit)
        return {
            "status": response.status_code,
            "headers": [(k, redact.mask_bytes(v)) for k, v in fields],
            "body": stored,
            "body_bytes": whole,
            "truncated": whole > len(body) or len(body) > limit or (whole > 0 and not body),
        }

    def _log_failure(self, e: StateError) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            logger.warning("keyswap: async queue unavailable: %s", e)

    def report(self) -> dict[str, Any]:
        """The queue for /_keyswap/health (as of the last few seconds) and this gateway's
        deliveries in flight."""
        figures = dict(self._figures)
        oldest = figures.pop("oldest_queued_at", None)
        figures["oldest_queued_age_s"] = (
            round(max(0.0, time.time() - unix(oldest)), 1) if oldest else None
        )
        figures["delivering_here"] = len(self._attempts)
        figures["attempts_here"] = self.attempts_made
        return figures


def _lease(
    session: Session, owner: str, lease_s: float, limit: int, proxy_ids: list[str]
) -> tuple[float, list[Job]]:
    """A lease timed on the thread that takes it (the wait for a thread, or for
    SQLite's write lock, does not eat into it): when it starts, and the requests."""
    now = time.time()
    jobs = async_queue.lease(session, owner, iso(now), iso(now + lease_s), limit, proxy_ids)
    return now, jobs
