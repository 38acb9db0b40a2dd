"""YAML 1.2 for PyYAML: plain scalars read as the command line's editor (ruamel.yaml,
YAML 1.2) writes them, so that `off`, `no`, `on` and `yes` stay strings.

PyYAML implements YAML 1.1, where those are booleans and `1:30` is the number 90. A
value the editor leaves unquoted because it is a string in YAML 1.2 must never come back
as anything else, so every form resolved here to a non-string is one ruamel.yaml also
resolves to that type (tests/config/test_yaml12.py holds the two to each other): the
YAML 1.2 core schema, plus the `_` digit separators, `0b` integers and `<<` merge keys
that ruamel.yaml also reads. Timestamps and `=` are strings (the core schema has
neither; the model parses dates from strings where it wants them).
"""

from __future__ import annotations

import re

import yaml

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_INT = re.compile(
    r"""^(?:[-+]?0b[01_]+
    |[-+]?0o[0-7_]+
    |[-+]?0x[0-9a-fA-F_]+
    |[-+]?[0-9][0-9_]*)$""",
    re.X,
)
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_MERGE = re.compile(r"^(?:<<)$")


class SafeLoader12(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 resolution of plain scalars."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """Base 10 unless prefixed: YAML 1.2 reads `017` as 17 (1.1 read it as octal 15)."""
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        text = text.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(text[:2], 10)
        return sign * int(text[2:] if base != 10 else text, base)


SafeLoader12.add_constructor("tag:yaml.org,2002:int", SafeLoader12.construct_yaml_int)
# A fresh table: none of YAML 1.1's implicit types (yes/no/on/off, sexagesimal,
# leading-zero octal, timestamps, `=`) is inherited.
SafeLoader12.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", _BOOL, "tTfF"),
    ("null", _NULL, ["~", "n", "N", ""]),
    ("int", _INT, "-+0123456789"),
    ("float", _FLOAT, "-+0123456789."),
    ("merge", _MERGE, "<"),
):
    SafeLoader12.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _pattern, list(_first))
