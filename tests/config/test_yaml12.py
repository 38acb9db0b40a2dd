"""The loader reads YAML 1.2, as the editor (ruamel.yaml) writes it."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import yaml
from ruamel.yaml import YAML

from keyswap.config.edit import dump
from keyswap.config.yaml12 import SafeLoader12

# Plain scalars whose reading differs between YAML 1.1 and 1.2, or that look like numbers.
_TRICKY = """
    on off On OFF yes no Yes NO y n Y N true True TRUE false False FALSE tRue
    null Null NULL ~ 017 0o17 0x1F 0b101 1_000 +12 -0 08 1:30 190:20:30 -1:30
    .5e3 .5e+3 1e3 1. 1.5 -2.5e-3 .inf -.Inf .NaN = << _ +_ 0x 0o 1_
    2026-01-01 2026-11-21T10:00:00Z 20/s 3128 127.0.0.1 ks_abc
"""
TRICKY = _TRICKY.split()


def read(text: str) -> Any:
    return yaml.load(text, SafeLoader12)  # noqa: S506 - SafeLoader12 is a SafeLoader


@pytest.mark.parametrize(
    ("plain", "value"),
    [
        ("on", "on"),
        ("off", "off"),
        ("yes", "yes"),
        ("no", "no"),
        ("y", "y"),
        ("n", "n"),
        ("ON", "ON"),
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("017", 17),  # YAML 1.1: octal 15
        ("0o17", 15),  # YAML 1.1: a string
        ("0x1F", 31),
        ("-0x10", -16),
        ("0b101", 5),
        ("1_000", 1000),
        ("1:30", "1:30"),  # YAML 1.1: 90 (sexagesimal)
        ("1e3", 1000.0),  # YAML 1.1: a string
        ("1.5", 1.5),
        (".inf", math.inf),
        ("2026-01-01", "2026-01-01"),  # YAML 1.1: a date
        ("2026-11-21T10:00:00Z", "2026-11-21T10:00:00Z"),
        ("=", "="),  # YAML 1.1: a "value" PyYAML cannot even construct
    ],
)
def test_plain_scalars_read_as_yaml_1_2(plain: str, value: object) -> None:
    got = read(f"k: {plain}\n")["k"]
    assert got == value and type(got) is type(value)


def test_keys_too() -> None:
    assert read("off: 1\nyes: 2\nno: 3\non: 4\ntrue: 5\n") == {
        "off": 1,
        "yes": 2,
        "no": 3,
        "on": 4,
        True: 5,
    }


def test_pyyaml_itself_is_left_as_it_was() -> None:
    assert yaml.safe_load("k: on\n") == {"k": True}


@pytest.mark.parametrize("text", TRICKY)
def test_what_the_editor_writes_reads_back_the_same(text: str) -> None:
    """A string the editor leaves unquoted is a string to the loader, and the editor's
    numbers, booleans and nulls are the loader's too."""
    for value in (text, {text: "key"}):
        written = dump({"k": value})  # type: ignore[arg-type]
        assert read(written) == {"k": value}, written
    for value in (True, False, None, 0, -17, 3128, 1.5, 1e-9, math.inf):
        assert read(dump({"k": value})) == {"k": value}  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [t for t in TRICKY if t != "<<"])  # `<<` is a merge key
def test_a_plain_scalar_is_never_read_as_a_type_the_editor_does_not_see_in_it(
    text: str,
) -> None:
    """Where the loader reads a non-string, ruamel.yaml reads the same value: what the
    loader leaves a string is at most a type ruamel.yaml knows and the core schema does
    not (timestamps, `=`) or text no YAML reads as a number."""
    ours = read(f"k: {text}\n")["k"]
    if isinstance(ours, str):
        return
    try:
        theirs = YAML(typ="safe", pure=True).load(io.StringIO(f"k: {text}\n"))["k"]
    except Exception as e:  # pragma: no cover - would be the failure being tested
        pytest.fail(f"ruamel.yaml cannot read {text!r} ({e}); the loader reads {ours!r}")
    same = ours == theirs or (isinstance(ours, float) and math.isnan(ours) and math.isnan(theirs))
    assert same and type(ours) is type(theirs), (text, ours, theirs)
