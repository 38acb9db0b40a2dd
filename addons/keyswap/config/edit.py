"""Editing the config file: one edit at a time (a lock beside the file), edits keep the
YAML's comments and order (ruamel.yaml, which mitmproxy brings), are validated before
anything is written, and replace the file atomically. An edit that changes nothing
writes nothing, and a dry run validates the edit and writes nothing."""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import io
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
    return _parse(Path(path).read_text(), path)


def _parse(text: str, path: str | os.PathLike[str]) -> CommentedMap:
    doc = _yaml().load(text)
    if not isinstance(doc, CommentedMap):
        raise ValueError(f"{path} is not a YAML mapping")
    return doc


@dataclass(frozen=True)
class Change:
    """What `ConfigEdit.save()` did to the file or, in a dry run, would do."""

    path: Path
    before: str  # the document as read, laid out as the editor writes it
    after: str  # the document as edited
    written: bool
    loaded: LoadedConfig | None  # the validated result; None when nothing changed
    relaid: int = 0  # other lines the write re-lays out (ruamel.yaml's `{a: b}` spacing)

    @property
    def unchanged(self) -> bool:
        return self.before == self.after

    def diff(self, label: str, placeholders: Mapping[str, str] | None = None) -> str:
        """The change as a unified diff of the YAML; each key of `placeholders` (a value
        that must not be shown) is replaced by its value."""
        lines = difflib.unified_diff(
            self.before.splitlines(),
            self.after.splitlines(),
            f"{self.path}",
            f"{self.path} ({label})",
            lineterm="",
        )
        text = "\n".join(lines)
        for value, placeholder in (placeholders or {}).items():
            text = text.replace(value, placeholder)
        return text


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
    the same text and overwrite each other's change. `save()` writes nothing when the
    edit changes nothing, nor when `dry_run` is set; the `Change` it returns says which."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        dry_run: bool = False,
    ) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.dry_run = dry_run
        self._lock_fd: int | None = None
        self._doc: CommentedMap | None = None
        self._snapshot: CommentedMap | None = None
        self._read = ""  # the file's text, as read under the lock
        self._before = ""  # the same document as the editor would write it, unedited

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
            # Only now: no other edit can be under way.
            self._read = self.path.read_text()
            self._doc = _parse(self._read, self.path)
            self._before = dump(self._doc)
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

    def remove(self, section: str, name: str) -> Any:
        """Delete `name` from a top-level section, and the section when that leaves it
        empty; returns what was deleted."""
        mapping = self.section(section)
        value = mapping.pop(name)
        mapping.ca.items.pop(name, None)  # its comments must not return with a namesake
        if not mapping:
            # `section: {}` would be written below the section's own comment, where YAML
            # does not allow it; an absent section means the same.
            del self.doc[section]
            self.doc.ca.items.pop(section, None)
        return value

    def text(self) -> str:
        return dump(self.doc)

    def save(self) -> Change:
        """Validate the edited document and, only if it is valid, replace the file: unless
        the edit changes nothing (then nothing is validated or written) or this is a dry
        run. Raises `ConfigError` (nothing written) when the edit would break the config."""
        if not self.locked:
            raise RuntimeError(f"{self.path}: save() outside the lock; use `with ConfigEdit(...)`")
        text = self.text()
        change = Change(self.path, self._before, text, written=False, loaded=None)
        if change.unchanged:
            return change
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
            loaded = dataclasses.replace(loaded, path=self.path)
            if self.dry_run:
                Path(tmp).unlink()
                relaid = _changed_lines(self._read, self._before)
                return dataclasses.replace(change, loaded=loaded, relaid=relaid)
            if self.path.exists():
                os.chmod(tmp, self.path.stat().st_mode & 0o7777)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dataclasses.replace(change, loaded=loaded, written=True)


def _changed_lines(a: str, b: str) -> int:
    diff = difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
    return sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))


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
