"""Telling clusters of zeros from data, at memcmp speed.

``memoryview == bytes`` compares item by item: about 90 µs for a 64 KiB cluster of
zeros, which is what a backup of a preallocated disk meets at every cluster.
``bytes.startswith`` takes any buffer and compares with memcmp: about 1 µs.
"""

from __future__ import annotations

_ZEROS = bytes(64 * 1024)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte of ``data`` is zero."""
    view = memoryview(data).cast("B")
    step = len(_ZEROS)
    return all(_ZEROS.startswith(view[pos : pos + step]) for pos in range(0, len(view), step))
