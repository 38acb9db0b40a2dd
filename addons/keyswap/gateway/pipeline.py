"""The gateway's stages as one mitmproxy addon.

Each concern stays its own class in its own module, with mitmproxy's hook names. But
mitmproxy dispatches every event to every addon through a coroutine, a context manager
and a dataclass introspection each (see the profile in the README's performance
section), so a dozen small addons cost more than the work they do. Pipeline registers
once and calls the stages' hooks directly, in order; a stage's async hook only makes the
event asynchronous when it actually runs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import exceptions, http

from keyswap.gateway import problem

logger = logging.getLogger(__name__)

# Hooks the stages may implement. Lifecycle hooks let exceptions through on purpose:
# an OptionsError in `configure` must roll the option change back.
LIFECYCLE = ("load", "configure", "running", "done")
EVENTS = (
    "client_connected",
    "client_disconnected",
    "next_layer",
    "http_connect",
    "http_connected",
    "http_connect_error",
    "requestheaders",
    "request",
    "responseheaders",
    "response",
    "error",
    "http_connect_upstream",
    "server_connect",
    "server_connected",
    "server_connect_error",
    "tls_start_server",
    "websocket_message",
)

Hook = Callable[..., Any]


class Pipeline:
    """Calls each stage's hook in stage order, as if each were an addon of its own."""

    def __init__(self, stages: list[object]) -> None:
        self.stages = stages
        self.hooks: dict[str, list[Hook]] = {
            name: [getattr(s, name) for s in stages if callable(getattr(s, name, None))]
            for name in (*LIFECYCLE, *EVENTS)
        }
        for name in EVENTS:
            setattr(self, name, self._dispatcher(name))

    def load(self, loader: Any) -> None:
        for hook in self.hooks["load"]:
            hook(loader)

    def configure(self, updated: set[str]) -> None:
        for hook in self.hooks["configure"]:
            hook(updated)

    def running(self) -> None:
        for hook in self.hooks["running"]:
            hook()

    async def done(self) -> None:
        # In stage order: the drain waits for requests in flight before anything closes.
        for hook in self.hooks["done"]:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("keyswap: shutting down %s failed", hook)

    def _dispatcher(self, name: str) -> Callable[..., Awaitable[None] | None]:
        hooks = self.hooks[name]
        fail = _refuse if name in REQUEST_SIDE else None

        def dispatch(*args: Any) -> Awaitable[None] | None:
            return _run(hooks, args, fail)

        dispatch.__name__ = name
        return dispatch


# A stage that fails while the request is being decided must not let it through half
# checked: the request is answered 500 instead (fail closed).
REQUEST_SIDE = frozenset({"http_connect", "requestheaders", "request"})


def _refuse(flow: http.HTTPFlow) -> None:
    if flow.response is None:
        flow.request.stream = False
        flow.response = problem.make(flow, 500, "internal", "keyswap failed to process the request")
        flow.metadata[problem.ANSWERED] = True


Fail = Callable[[http.HTTPFlow], None] | None


def _run(hooks: list[Hook], args: tuple[Any, ...], fail: Fail) -> Awaitable[None] | None:
    """Call the hooks in order. Once one returns an awaitable, the rest run after it,
    in the coroutine returned; until then the event stays synchronous (cheap)."""
    for i, hook in enumerate(hooks):
        try:
            result = hook(*args)
        except exceptions.AddonHalt:
            raise
        except Exception:
            _failed(hook, args, fail)
            continue
        if result is not None and inspect.isawaitable(result):
            return _rest(result, hooks[i + 1 :], args, fail)
    return None


async def _rest(
    first: Awaitable[Any], hooks: list[Hook], args: tuple[Any, ...], fail: Fail
) -> None:
    try:
        await first
    except Exception:
        _failed(first, args, fail)
    more = _run(hooks, args, fail)
    if more is not None:
        await more


def _failed(hook: object, args: tuple[Any, ...], fail: Fail) -> None:
    """A failure is logged; on the request side it also refuses the flow. On the
    response side the other stages still run (as mitmproxy does)."""
    logger.exception("keyswap: %s failed", getattr(hook, "__qualname__", hook))
    if fail is not None:
        fail(args[0])
