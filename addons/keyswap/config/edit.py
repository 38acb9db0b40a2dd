"""Editing the config file: one edit at a time (a lock beside the file), edits keep the
YAML's comments and order (ruamel.yaml, which mitmproxy brings), are validated before
anything is written, and replace the file atomically."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import tempfile
import time
from pathlib import Path
from types import TracebackType
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


LOCK_TIMEOUT_S = 30.0


def read_document(path: str | os.PathLike[str]) -> CommentedMap:
    """The config file as a round-trip document (comments kept); read-only unless edited
    through `ConfigEdit`."""
    doc = _yaml().load(Path(path).read_text())
    if not isinstance(doc, CommentedMap):
        raise ValueError(f"{path} is not a YAML mapping")
    return doc


def lock_path(config: Path) -> Path:
    """The lock file beside the config. The config itself is replaced on every save, so a
    lock on it would be a lock on a file that is about to stop being the config."""
    return config.with_name(f".{config.name}.lock")


class ConfigLocked(TimeoutError):
    """Another edit held the config's lock for longer than we wait."""

    def __init__(self, config: Path, waited_s: float) -> None:
        self.config = config
        self.lock = lock_path(config)
        super().__init__(
            f"{config} is being changed by another command: its lock {self.lock} was held"
            f" for over {waited_s:g} s; retry when that command has finished"
        )


class ConfigEdit:
    """The config file as an editable document, locked against every other edit:

        with ConfigEdit(path) as edit:   # waits for the lock, then reads the file
            edit.section("proxies")[...] = ...
            edit.save()                  # validates, replaces the file

    The lock is held from the read to the end of the block, so two edits never start from
    the same text and overwrite each other's change."""

    def __init__(
        self, path: str | os.PathLike[str], *, lock_timeout_s: float = LOCK_TIMEOUT_S
    ) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._lock_fd: int | None = None
        self._doc: CommentedMap | None = None
        self._snapshot: CommentedMap | None = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> ConfigEdit:
        """Take the lock (waiting at most `lock_timeout_s`, else `ConfigLocked`), then read."""
        if self.locked:
            raise RuntimeError(f"{self.path} is already locked by this edit")
        if self._snapshot is not None:
            raise RuntimeError(f"{self.path} was read before it was locked; edit inside `with`")
        fd = os.open(lock_path(self.path), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _flock_within(fd, self.lock_timeout_s, self.path)
            self._doc = read_document(self.path)  # only now: no other edit can be under way
        except BaseException:
            os.close(fd)  # closing the descriptor releases the lock
            raise
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        """Release the lock; the document can no longer be saved. Safe to call twice."""
        fd, self._lock_fd, self._doc = self._lock_fd, None, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> ConfigEdit:
        return self.lock()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.unlock()

    @property
    def doc(self) -> CommentedMap:
        """The document being edited; outside the lock, a read-only snapshot (which
        `save()` refuses to write)."""
        if self._doc is not None:
            return self._doc
        if self._snapshot is None:
            self._snapshot = read_document(self.path)
        return self._snapshot

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
        if not self.locked:
            raise RuntimeError(f"{self.path}: save() outside the lock; use `with ConfigEdit(...)`")
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


def _flock_within(fd: int, timeout_s: float, config: Path) -> None:
    """An exclusive `flock` on `fd`, polled so that the wait is bounded (a blocking flock
    cannot time out without signals). Released by the kernel when the process dies."""
    started = time.monotonic()
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                raise ConfigLocked(config, timeout_s) from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
