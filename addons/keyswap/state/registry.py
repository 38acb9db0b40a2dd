"""The registry of live gateways: each gateway announces itself in the `gateways` table,
so that commands which change the config can wait until every one serves the change."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Any

from keyswap.state.store import open_db


def live_gateways(db_path: Path, config_path: Path) -> list[dict[str, Any]]:
    """Gateways that said they serve this config file and whose process still exists."""
    if not db_path.exists():
        return []
    with closing(open_db(db_path)) as db:
        rows = list(db["gateways"].rows) if db["gateways"].exists() else []
    alive = []
    for row in rows:
        if Path(row["config"]).resolve() != config_path.resolve():
            continue
        try:
            os.kill(int(row["pid"]), 0)
        except (ProcessLookupError, PermissionError, ValueError):
            continue
        alive.append(row)
    return alive
