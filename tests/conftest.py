"""Shared fixtures: paths of the repository and helpers to write configs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def write_config(tmp_path: Path):
    def write(text: str, name: str = "keyswap.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
