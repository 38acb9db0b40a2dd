"""Editing the config file: edits keep the YAML's comments and order (ruamel.yaml, which
mitmproxy brings), are validated before anything is written, and replace the file
atomically."""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from keyswap.config.loader import ConfigError, LoadedConfig, load_config


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def dump(doc: CommentedMap) -> str:
    out = io.StringIO()
    _yaml().dump(doc, out)
    return out.getvalue()


def flow_map(items: dict[str, Any]) -> CommentedMap:
    """A mapping written inline, `{ id: web, sha256: ... }`, as the examples do."""
    m = CommentedMap(items)
    m.fa.set_flow_style()
    return m


def flow_seq(items: list[Any]) -> CommentedSeq:
    s = CommentedSeq(items)
    s.fa.set_flow_style()
    return s


class ConfigEdit:
    """The config file as an editable document."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.doc: CommentedMap = _yaml().load(self.path.read_text())
        if not isinstance(self.doc, CommentedMap):
            raise ValueError(f"{self.path} is not a YAML mapping")

    def section(self, name: str) -> CommentedMap:
        """A top-level section, created (at the end) when missing."""
        if self.doc.get(name) is None:
            self.doc[name] = CommentedMap()
        section = self.doc[name]
        if not isinstance(section, CommentedMap):
            raise ValueError(f"{name} must be a mapping")
        return section

    def text(self) -> str:
        return dump(self.doc)

    def save(self) -> LoadedConfig:
        """Validate the edited document and, only if it is valid, replace the file.
        Raises `ConfigError` (nothing written) when the edit would break the config."""
        text = self.text()
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            try:
                loaded = load_config(tmp)  # same folder: relative ${file:} paths still resolve
            except ConfigError as e:
                raise ConfigError(
                    [dataclasses.replace(p, file=str(self.path)) for p in e.problems]
                ) from None
            if self.path.exists():
                os.chmod(tmp, self.path.stat().st_mode & 0o7777)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dataclasses.replace(loaded, path=self.path)
