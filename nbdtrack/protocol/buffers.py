"""Receive buffers, shared by the server's request parser and the client's reply parser.

Each parser keeps the bytes received but not parsed yet in ``buf[pos:end]`` and lets the
socket write the next ones straight into ``buf[end:]`` (``recv_into``), so that headers
are parsed where the kernel put them.
"""

from __future__ import annotations


def make_room(
    buf: bytearray, pos: int, end: int, need: int, usual: int
) -> tuple[bytearray, int, int]:
    """``(buf, pos, end)`` with at least ``need`` free bytes after ``end``.

    The unparsed bytes are moved to the front, or into a new buffer (at least twice as
    large: a large chunk arriving read by read is copied a few times, not once per read);
    the buffer is never resized in place, since a view of it handed to a socket may still
    be alive. An emptied buffer larger than ``usual`` is replaced by one of that size.
    """
    kept = end - pos
    if not kept:
        pos = end = 0
        if len(buf) > usual >= need:
            buf = bytearray(usual)
    if len(buf) - end >= need:
        return buf, pos, end
    if kept + need <= len(buf):
        with memoryview(buf) as view:
            view[:kept] = view[pos:end]  # a memmove: the ranges may overlap
    else:
        grown = bytearray(max(usual, kept + need, 2 * len(buf)))
        with memoryview(buf) as view:
            grown[:kept] = view[pos:end]
        buf = grown
    return buf, 0, kept
