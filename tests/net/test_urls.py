import pytest

from keyswap.net.urls import with_query_param


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/x", "/x?key=s%2Fk"),
        ("/x?a=1", "/x?a=1&key=s%2Fk"),
        ("/x?key=client&a=%20&key=again", "/x?a=%20&key=s%2Fk"),
        ("/x?a=1&&b", "/x?a=1&b&key=s%2Fk"),
    ],
)
def test_query_credential_replaces_only_its_parameter(path: str, expected: str) -> None:
    assert with_query_param(path, "key", "s/k") == expected
