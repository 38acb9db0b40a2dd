import sqlite3

import pytest

from keyswap.net.text import shown


@pytest.mark.parametrize(
    "value, expected",
    [
        ("plain", "plain"),
        ("é ok", "é ok"),
        ("a\udcffb", "a\\xffb"),  # what mitmproxy's surrogateescape makes of b"a\xffb"
        (b"x\xff\xfey", "x\\xff\\xfey"),
        ("\ud800 lone", "\\ud800 lone"),
        ("", ""),
    ],
)
def test_client_bytes_become_text_any_store_accepts(value: str | bytes, expected: str) -> None:
    text = shown(value)
    assert text == expected
    with sqlite3.connect(":memory:") as db:
        db.execute("create table t (v text)")
        db.execute("insert into t values (?)", [text])
    db.close()


def test_long_text_is_cut_with_a_marker() -> None:
    assert shown("x" * 10, limit=4) == "xxxx…[6 more characters]"
    assert len(shown("y" * 100_000)) < 8300
