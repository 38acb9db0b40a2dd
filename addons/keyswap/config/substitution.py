"""`${...}` substitution in configuration values.

`${name}` takes a param of the current environment, `${env:NAME}` and
`${env:NAME:-default}` an environment variable, `${file:PATH}` a file's contents
(one trailing newline dropped). `$${` writes a literal `${`. A value that cannot be
found is an error naming it, never an empty string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# `$${` (escape), a complete reference, or a `${` that never closes.
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_PARAM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Secrets are small; refusing large files keeps `${file:/dev/zero}` from hanging a reload.
MAX_FILE_BYTES = 64 * 1024

Scalar = str | int | float | bool


class SubstitutionError(ValueError):
    """A `${...}` reference that cannot be resolved; the message says which and why."""


@dataclass
class Resolver:
    """Resolves references against one environment's params, the process environment
    and files relative to the config file's folder. Records the files it read."""

    params: Mapping[str, Scalar]
    environ: Mapping[str, str]
    base_dir: Path
    environment: str = ""
    files_read: set[Path] = field(default_factory=set)

    def resolve(self, text: str, *, allow_params: bool = True) -> Scalar:
        """Substitute every reference in `text`. A value that is exactly one param
        reference keeps the param's type (so `port: ${corp.proxy.port}` stays an int)."""
        whole = _TOKEN.fullmatch(text)
        ref = whole.group(1) if whole else None
        if allow_params and ref is not None and _PARAM.fullmatch(ref):
            return self._param(ref)
        return _TOKEN.sub(lambda m: self._replace(m, allow_params), text)

    def _replace(self, match: re.Match[str], allow_params: bool) -> str:
        if match.group(0) == "$${":
            return "${"
        ref = match.group(1)
        if ref is None:
            raise SubstitutionError("unterminated '${': close it with '}' or write '$${'")
        if ref.startswith("env:"):
            return self._env(ref)
        if ref.startswith("file:"):
            return self._file(ref[len("file:") :])
        if _PARAM.fullmatch(ref):
            if not allow_params:
                raise SubstitutionError(
                    f"'${{{ref}}}': params cannot refer to other params; "
                    "use ${env:NAME} or ${file:PATH} here"
                )
            return str(self._param(ref))
        raise SubstitutionError(
            f"'${{{ref}}}' is not a reference keyswap knows; "
            "use ${param}, ${env:NAME}, ${env:NAME:-default} or ${file:PATH}"
        )

    def _env(self, ref: str) -> str:
        m = _ENV.fullmatch(ref)
        if not m:
            raise SubstitutionError(
                f"'${{{ref}}}': environment variable names are letters, digits and '_' "
                "(form: ${env:NAME} or ${env:NAME:-default})"
            )
        name, default = m.group(1), m.group(2)
        value = self.environ.get(name, "")
        if value:
            return value
        if default is not None:
            return default
        state = "is empty" if name in self.environ else "is not set"
        raise SubstitutionError(
            f"environment variable {name} {state}; set it, or give a default: "
            f"${{env:{name}:-default}}"
        )

    def _file(self, raw: str) -> str:
        if not raw:
            raise SubstitutionError("'${file:}' names no file")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if not path.is_file():
            state = "is not a regular file" if path.exists() else "does not exist"
            raise SubstitutionError(f"file {path} {state}")
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise SubstitutionError(f"file {path} cannot be read: {e.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise SubstitutionError(f"file {path} is larger than {MAX_FILE_BYTES} bytes")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise SubstitutionError(f"file {path} is not UTF-8 text") from None
        text = text.removesuffix("\n").removesuffix("\r")
        if not text:
            raise SubstitutionError(f"file {path} is empty")
        self.files_read.add(path)
        return text

    def _param(self, name: str) -> Scalar:
        if name not in self.params:
            env = self.environment
            raise SubstitutionError(
                f"param '{name}' is not defined for environment '{env}' (add it under params.{env})"
            )
        return self.params[name]


def is_indirect(text: str) -> bool:
    """True when `text` takes its value from the environment or a file (not a literal)."""
    return any(
        m.group(1) is not None and m.group(1).startswith(("env:", "file:"))
        for m in _TOKEN.finditer(text)
    )


def params_used(text: str) -> list[str]:
    """The param names `text` refers to."""
    return [
        m.group(1)
        for m in _TOKEN.finditer(text)
        if m.group(1) is not None and _PARAM.fullmatch(m.group(1))
    ]
