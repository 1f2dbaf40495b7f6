"""Transmission replies: reply objects to bytes, in the mode the handshake fixed.

Each method returns the list of buffers of one whole reply, ready for one
``writelines``: replies of different requests then never interleave on the wire.
Simple mode uses simple replies only (the kernel dies on anything else); structured
mode answers READ and BLOCK_STATUS with chunks; extended mode uses extended chunks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.events import Mode

Buffers = list[bytes | memoryview]


class ReadPiece(NamedTuple):
    """Part of a READ reply: ``data`` at ``offset``, or a hole of ``length`` zeros."""

    offset: int
    length: int
    data: bytes | memoryview | None  # None: reads as zeros


class Extent(NamedTuple):
    length: int
    flags: int


def clip_message(message: str) -> bytes:
    return message.encode()[: c.MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode()


class ReplyEncoder:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode

    def _chunk(self, flags: int, ctype: int, cookie: int, offset: int, length: int) -> bytes:
        if self.mode is Mode.EXTENDED:
            return c.EXTENDED_CHUNK.pack(
                c.NBD_EXTENDED_REPLY_MAGIC, flags, ctype, cookie, offset, length
            )
        return c.STRUCTURED_CHUNK.pack(c.NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, length)

    def ok(self, cookie: int, offset: int = 0) -> Buffers:
        """A bare success (WRITE, FLUSH, TRIM, ...)."""
        if self.mode is Mode.EXTENDED:
            return [self._chunk(c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_NONE, cookie, offset, 0)]
        return [c.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)]

    def error(self, cookie: int, error: int, message: str = "", offset: int = 0) -> Buffers:
        if self.mode is Mode.SIMPLE:
            return [c.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, error, cookie)]
        text = clip_message(message)
        payload = c.ERROR_HEADER.pack(error, len(text)) + text
        head = self._chunk(
            c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_ERROR, cookie, offset, len(payload)
        )
        return [head, payload]

    def read(self, cookie: int, offset: int, pieces: Sequence[ReadPiece]) -> Buffers:
        """A successful READ whose pieces cover the request exactly, in order."""
        if self.mode is Mode.SIMPLE:
            out: Buffers = [c.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)]
            out.extend(p.data if p.data is not None else bytes(p.length) for p in pieces)
            return out
        out = []
        last = len(pieces) - 1
        if last < 0:  # zero-length read
            return [self._chunk(c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_NONE, cookie, offset, 0)]
        for i, piece in enumerate(pieces):
            flags = c.NBD_REPLY_FLAG_DONE if i == last else 0
            if piece.data is None:
                out.append(
                    self._chunk(
                        flags, c.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, offset, c.OFFSET_HOLE.size
                    )
                )
                out.append(c.OFFSET_HOLE.pack(piece.offset, piece.length))
            else:
                out.append(
                    self._chunk(
                        flags, c.NBD_REPLY_TYPE_OFFSET_DATA, cookie, offset, 8 + piece.length
                    )
                )
                out.append(c.U64.pack(piece.offset))
                out.append(piece.data)
        return out

    def block_status(
        self, cookie: int, offset: int, answers: Sequence[tuple[int, Sequence[Extent]]]
    ) -> Buffers:
        """One status chunk per (context id, extents); DONE on the last."""
        out: Buffers = []
        last = len(answers) - 1
        for i, (context_id, extents) in enumerate(answers):
            flags = c.NBD_REPLY_FLAG_DONE if i == last else 0
            if self.mode is Mode.EXTENDED:
                payload = c.BLOCK_STATUS_EXT_HEADER.pack(context_id, len(extents)) + b"".join(
                    c.EXTENT_EXT.pack(length, state) for length, state in extents
                )
                ctype = c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT
            else:
                payload = c.U32.pack(context_id) + b"".join(
                    c.EXTENT.pack(length, state) for length, state in extents
                )
                ctype = c.NBD_REPLY_TYPE_BLOCK_STATUS
            out.append(self._chunk(flags, ctype, cookie, offset, len(payload)))
            out.append(payload)
        return out


def shape_extents(
    extents: Sequence[Extent], length: int, req_one: bool, limit: int = c.MAX_EXTENTS
) -> list[Extent]:
    """Extents as a BLOCK_STATUS chunk must carry them.

    Zero-length extents dropped, equal neighbours merged, nothing past ``length`` (the
    request end, already clipped to the export end), at most ``limit`` extents, just one
    with REQ_ONE. The result is never empty when ``length`` > 0 and extents cover it.
    """
    out: list[Extent] = []
    covered = 0
    for ext_length, flags in extents:
        if covered >= length:
            break
        ext_length = min(ext_length, length - covered)
        if ext_length <= 0:
            continue
        covered += ext_length
        if out and out[-1].flags == flags:
            out[-1] = Extent(out[-1].length + ext_length, flags)
        elif len(out) == limit:
            break
        else:
            out.append(Extent(ext_length, flags))
    if req_one:
        del out[1:]
    return out
