"""is_zero against the obvious definition, on every length and every position of a
stray byte (across its 64 KiB comparison steps)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdtrack.backup.zeros import is_zero


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(0, 200_000),
    stray=st.one_of(st.none(), st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255))),
    kind=st.sampled_from(["bytes", "bytearray", "memoryview", "slice"]),
)
def test_is_zero_matches_the_definition(length, stray, kind) -> None:
    data = bytearray(length + 7)
    if stray is not None and length:
        where, value = stray
        data[int(where * length)] = value
    buffer = {
        "bytes": lambda: bytes(data[:length]),
        "bytearray": lambda: data[:length],
        "memoryview": lambda: memoryview(bytes(data[:length])),
        "slice": lambda: memoryview(data)[:length],
    }[kind]()
    assert is_zero(buffer) == (data[:length].count(0) == length)
