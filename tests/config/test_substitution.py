from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyswap.config.substitution import Resolver, SubstitutionError, is_indirect, params_used


@pytest.fixture
def resolver(tmp_path: Path) -> Resolver:
    (tmp_path / "secret.txt").write_text("s3cret\n")
    (tmp_path / "empty.txt").write_text("\n")
    return Resolver(
        params={"corp.proxy.host": "10.0.0.1", "corp.proxy.port": 3128},
        environ={"TOKEN": "tok", "EMPTY": ""},
        base_dir=tmp_path,
        environment="dev",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("${env:TOKEN}", "tok"),
        ("Bearer ${env:TOKEN}!", "Bearer tok!"),
        ("${env:MISSING:-fallback}", "fallback"),
        ("${env:EMPTY:-fallback}", "fallback"),
        ("${env:MISSING:-}", ""),
        ("${file:secret.txt}", "s3cret"),
        ("${corp.proxy.host}", "10.0.0.1"),
        ("${corp.proxy.port}", 3128),  # a whole-value param keeps its type
        ("http://${corp.proxy.host}:${corp.proxy.port}", "http://10.0.0.1:3128"),
        ("$${env:TOKEN}", "${env:TOKEN}"),
        ("cost: $5", "cost: $5"),
    ],
)
def test_resolves(resolver: Resolver, text: str, expected: object) -> None:
    assert resolver.resolve(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${env:MISSING}", "environment variable MISSING is not set"),
        ("${env:EMPTY}", "environment variable EMPTY is empty"),
        ("${env:1BAD}", "environment variable names are letters"),
        ("${file:nope.txt}", "nope.txt does not exist"),
        ("${file:empty.txt}", "is empty"),
        ("${file:}", "names no file"),
        ("${file:.}", "is not a regular file"),
        ("${unknown.param}", "param 'unknown.param' is not defined for environment 'dev'"),
        ("${what ever}", "is not a reference keyswap knows"),
        ("abc ${env:TOKEN", "unterminated"),
    ],
)
def test_errors_name_the_value(resolver: Resolver, text: str, message: str) -> None:
    with pytest.raises(SubstitutionError, match=message):
        resolver.resolve(text)


def test_params_cannot_refer_to_params(resolver: Resolver) -> None:
    with pytest.raises(SubstitutionError, match="params cannot refer to other params"):
        resolver.resolve("${corp.proxy.host}", allow_params=False)


def test_large_files_are_refused(resolver: Resolver, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 70_000)
    with pytest.raises(SubstitutionError, match="larger than"):
        resolver.resolve("${file:big}")


def test_records_files_read(resolver: Resolver, tmp_path: Path) -> None:
    resolver.resolve("${file:secret.txt}")
    assert resolver.files_read == {tmp_path / "secret.txt"}


def test_indirect_and_params_used() -> None:
    assert is_indirect("${env:X}") and is_indirect("a${file:/x}b")
    assert not is_indirect("sk_live_123") and not is_indirect("${param}")
    assert params_used("${a.b}:${env:X}:${c}") == ["a.b", "c"]


@given(st.text(alphabet=st.sampled_from(list("${}:-envfil_AZ./\\ \n\x00é")), max_size=40))
def test_any_input_resolves_or_raises_a_config_error(text: str) -> None:
    resolver = Resolver({"a": "1"}, {"A": "x"}, Path("/nonexistent-keyswap-dir"), "dev")
    try:
        result = resolver.resolve(text)
    except SubstitutionError:
        return
    assert isinstance(result, str | int | float | bool)


@given(st.text(max_size=60))
def test_arbitrary_unicode_never_crashes(text: str) -> None:
    resolver = Resolver({}, {}, Path("/nonexistent-keyswap-dir"), "dev")
    try:
        resolver.resolve(text)
    except SubstitutionError:
        pass
