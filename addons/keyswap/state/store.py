"""What the state's rows share: timestamps, request ids, audit rows. (The tables are
keyswap.state.migrations'; the backends hold them.)"""

from __future__ import annotations

import calendar
import getpass
import itertools
import json
import os
import time
from functools import lru_cache
from typing import Any

from keyswap.state.backends import Session

AUDIT_ACTIONS = (
    "create",
    "edit",
    "enable",
    "disable",
    "rotate-token",
    "delete",
    "reload",
    "reload-failed",
    "async-retry",
    "async-cancel",
)


def iso(ts: float) -> str:
    """A Unix time as UTC ISO 8601 with milliseconds: sorts as text."""
    return f"{_iso_second(int(ts))}.{int(ts * 1000) % 1000:03d}Z"


@lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    """Formatted once per second, not once per log row."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def unix(stamp: str) -> float:
    """An `iso()` time back as Unix seconds."""
    whole = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    return whole + float("0" + stamp[19:23].rstrip("Z"))


def now_iso() -> str:
    return iso(time.time())


def audit_row(
    action: str, resource: str, detail: dict[str, Any], actor: str | None = None
) -> dict[str, Any]:
    """An `audit` row; `detail` must hold no secret."""
    assert action in AUDIT_ACTIONS, action
    return {
        "at": now_iso(),
        "actor": actor or _os_user(),
        "action": action,
        "resource": resource,
        "detail": json.dumps(detail, sort_keys=True),
    }


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def audit(
    session: Session, action: str, resource: str, detail: dict[str, Any], actor: str | None
) -> None:
    """Record a change made from the command line (no secret in `detail`)."""
    with session.transaction():
        session.insert("audit", [audit_row(action, resource, detail, actor)])


_PROCESS = os.urandom(4).hex()  # tells gateways (and restarts) apart
_SEQUENCE = itertools.count()


def new_request_id() -> str:
    """26 hex digits, time-ordered and unique: milliseconds, process, sequence."""
    return f"{time.time_ns() // 1_000_000:012x}{_PROCESS}{next(_SEQUENCE) % 0x1000000:06x}"
