"""Reading `Prefer` (RFC 7240): which values ask for respond-async, and what is left
for the target."""

import pytest

from keyswap.gateway.stages.async_accept import other_preferences, prefers_async


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("respond-async", True),
        ("Respond-Async", True),
        ("respond-async, wait=10", True),
        ("wait=10; x, respond-async ;foo", True),
        ("return=minimal", False),
        ("respond-asynchronously", False),
        ("x=respond-async", False),
        ("", False),
        (None, False),
    ],
)
def test_prefers_async(value: str | None, expected: bool) -> None:
    assert prefers_async(value) is expected


def test_the_other_preferences_stay() -> None:
    assert other_preferences("respond-async, wait=10") == "wait=10"
    assert other_preferences("respond-async") == ""
    assert other_preferences("return=minimal,respond-async;x, handling=lenient") == (
        "return=minimal, handling=lenient"
    )
