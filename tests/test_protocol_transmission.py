"""The sans-IO transmission phase, byte by byte: request parsing, validation, replies."""

from __future__ import annotations

import struct

import pytest

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.errors import ProtocolError, RequestError, nbd_error
from nbdtrack.protocol.events import Mode, Request
from nbdtrack.protocol.replies import Extent, ReadPiece, ReplyEncoder, shape_extents
from nbdtrack.protocol.requests import (
    HEADER_ALONE_AFTER,
    POOL_BYTES,
    SCRATCH_BYTES,
    ExportLimits,
    RequestParser,
    check_request,
)

SIZE = 1 << 20


def compact(cmd, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return c.REQUEST.pack(c.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def extended(cmd, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return (
        c.EXTENDED_REQUEST.pack(c.NBD_EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        + payload
    )


def parse_all(parser: RequestParser, data: bytes) -> list[Request]:
    parser.receive_data(data)
    out = []
    while (req := parser.next_request()) is not None:
        out.append(req)
    return out


# --- parsing -------------------------------------------------------------------------


def test_compact_read_header():
    [req] = parse_all(RequestParser(Mode.SIMPLE), compact(c.NBD_CMD_READ, 4096, 512, cookie=99))
    assert (req.command, req.flags, req.cookie, req.offset, req.length) == (0, 0, 99, 4096, 512)
    assert req.data is None and req.error is None


def test_write_is_emitted_only_with_its_whole_payload():
    parser = RequestParser(Mode.STRUCTURED)
    stream = compact(c.NBD_CMD_WRITE, 0, 5, payload=b"hello") + compact(c.NBD_CMD_FLUSH)
    got = []
    for b in stream:
        got += parse_all(parser, bytes([b]))
        if len(got) == 0:
            assert parser.partial
    assert [r.command for r in got] == [c.NBD_CMD_WRITE, c.NBD_CMD_FLUSH]
    assert got[0].data == b"hello"
    assert not parser.partial


def write_through_buffers(parser: RequestParser, data: bytes) -> list[Request]:
    """Feed ``data`` as asyncio.BufferedProtocol does, one get_buffer at a time."""
    out, pos = [], 0
    while pos < len(data):
        buf = parser.get_buffer(-1)
        take = min(len(buf), len(data) - pos)
        buf[:take] = data[pos : pos + take]
        parser.buffer_updated(take)
        pos += take
        while (req := parser.next_request()) is not None:
            out.append(req)
    return out


def test_recycled_payload_buffers_take_the_next_payload_of_their_size():
    parser = RequestParser(Mode.STRUCTURED, direct_payload=1024)
    first, second, third = (bytes([n]) * 4096 for n in (1, 2, 3))
    [a] = write_through_buffers(parser, compact(c.NBD_CMD_WRITE, 0, 4096, payload=first))
    assert a.data == first
    parser.recycle(a.data)
    parser.recycle(a.data)  # twice by mistake: still handed out once
    [b, c2] = write_through_buffers(
        parser,
        compact(c.NBD_CMD_WRITE, 0, 4096, payload=second)
        + compact(c.NBD_CMD_WRITE, 0, 4096, payload=third),
    )
    assert b.data.obj is a.data.obj and b.data == second  # reused, holding the new payload
    assert c2.data.obj is not b.data.obj and c2.data == third
    [d] = write_through_buffers(parser, compact(c.NBD_CMD_WRITE, 0, 2048, payload=first[:2048]))
    assert d.data.obj is not b.data.obj  # other sizes get their own


def test_after_a_large_payload_the_next_header_is_read_alone():
    """So that the next payload is received into its own buffer, not copied into it."""
    parser = RequestParser(Mode.STRUCTURED, direct_payload=1024)
    large = HEADER_ALONE_AFTER
    assert len(parser.get_buffer(-1)) > 4096  # nothing known yet: read what is there
    write_through_buffers(parser, compact(c.NBD_CMD_WRITE, 0, large, payload=bytes(large)))
    assert len(parser.get_buffer(-1)) == c.REQUEST.size
    parser.receive_data(compact(c.NBD_CMD_FLUSH)[:10])
    assert len(parser.get_buffer(-1)) == c.REQUEST.size - 10  # the rest of the header
    parser.receive_data(compact(c.NBD_CMD_FLUSH)[10:])
    assert parser.next_request().command == c.NBD_CMD_FLUSH
    assert len(parser.get_buffer(-1)) > 4096  # small requests: read many at once again
    write_through_buffers(parser, compact(c.NBD_CMD_WRITE, 0, 4096, payload=bytes(4096)))
    assert len(parser.get_buffer(-1)) > 4096  # received in place, but not large enough
    extended_parser = RequestParser(Mode.EXTENDED)
    write_through_buffers(
        extended_parser, extended(c.NBD_CMD_WRITE, 0, large, payload=bytes(large))
    )
    assert len(extended_parser.get_buffer(-1)) == c.EXTENDED_REQUEST.size


def test_recycling_keeps_at_most_pool_bytes_and_large_payloads_only():
    parser = RequestParser(Mode.STRUCTURED, direct_payload=1024)
    size = POOL_BYTES // 4
    buffers = [memoryview(bytearray(size)) for _ in range(6)]
    for buf in buffers:
        parser.recycle(buf)
    parser.recycle(bytearray(512))  # small payloads are slices, not pooled
    parser.recycle(b"x" * 2048)
    got = write_through_buffers(
        parser, b"".join(compact(c.NBD_CMD_WRITE, 0, size, payload=bytes(size)) for _ in range(6))
    )
    reused = {id(req.data.obj) for req in got} & {id(buf.obj) for buf in buffers}
    assert len(reused) == 4


def test_the_buffer_shrinks_back_after_a_large_receive_data():
    parser = RequestParser(Mode.STRUCTURED)
    many = compact(c.NBD_CMD_WRITE, 0, 4000, payload=b"w" * 4000) * 300  # ~1.2 MB at once
    assert len(parse_all(parser, many)) == 300
    view = parser.get_buffer(-1)
    assert len(view) <= SCRATCH_BYTES
    # A view from get_buffer may outlive the next call: the buffer is replaced, not resized.
    view[:28] = compact(c.NBD_CMD_READ, 0, 512, cookie=5)[:28]
    parser.buffer_updated(28)
    parser.receive_data(bytes(SCRATCH_BYTES))  # grows while ``view`` is alive (the bytes
    req = parser.next_request()  # are never parsed: they would be a bad magic)
    assert req is not None and req.cookie == 5
    view.release()


def test_truncated_request_is_never_emitted():
    parser = RequestParser(Mode.SIMPLE)
    data = compact(c.NBD_CMD_WRITE, 0, 1000, payload=b"x" * 999)
    assert parse_all(parser, data) == []
    assert parser.partial


def test_wrong_magic_is_a_protocol_error():
    parser = RequestParser(Mode.SIMPLE)
    bad = c.REQUEST.pack(c.NBD_SIMPLE_REPLY_MAGIC, 0, 0, 0, 0, 0)
    with pytest.raises(ProtocolError, match="magic"):
        parse_all(parser, bad)


def test_compact_magic_is_wrong_in_extended_mode():
    with pytest.raises(ProtocolError):
        parse_all(RequestParser(Mode.EXTENDED), compact(c.NBD_CMD_READ, 0, 512) + bytes(4))


def test_oversized_write_is_drained_and_answered_with_einval():
    parser = RequestParser(Mode.SIMPLE, max_payload=1024)
    payload = b"z" * 5000
    got = []
    stream = compact(c.NBD_CMD_WRITE, 0, 5000, cookie=1, payload=payload)
    stream += compact(c.NBD_CMD_READ, 0, 512, cookie=2)
    for i in range(0, len(stream), 333):
        got += parse_all(parser, stream[i : i + 333])
        assert parser.buffered < 1024  # drained, never buffered
    assert [r.cookie for r in got] == [1, 2]
    assert got[0].error is not None and got[0].error.error == c.NBD_EINVAL
    assert got[1].error is None


def test_extended_write_with_payload_len():
    parser = RequestParser(Mode.EXTENDED)
    [req] = parse_all(
        parser,
        extended(c.NBD_CMD_WRITE, 1 << 33, 3, flags=c.NBD_CMD_FLAG_PAYLOAD_LEN, payload=b"abc"),
    )
    assert req.offset == 1 << 33 and req.data == b"abc"


def test_extended_effect_length_beyond_32_bits():
    [req] = parse_all(RequestParser(Mode.EXTENDED), extended(c.NBD_CMD_TRIM, 0, 5 << 32))
    assert req.length == 5 << 32 and req.error is None


def test_extended_unexpected_payload_is_drained_with_einval():
    parser = RequestParser(Mode.EXTENDED)
    got = parse_all(
        parser,
        extended(c.NBD_CMD_BLOCK_STATUS, 0, 12, flags=c.NBD_CMD_FLAG_PAYLOAD_LEN, payload=bytes(12))
        + extended(c.NBD_CMD_FLUSH, cookie=8),
    )
    assert got[0].error.error == c.NBD_EINVAL
    assert got[1].command == c.NBD_CMD_FLUSH and got[1].error is None


# --- validation ----------------------------------------------------------------------


def limits(mode=Mode.STRUCTURED, read_only=False, contexts=True):
    return ExportLimits(size=SIZE, read_only=read_only, mode=mode, has_contexts=contexts)


def check(cmd, offset=0, length=0, flags=0, **kw) -> int | None:
    try:
        check_request(Request(cmd, flags, 1, offset, length), limits(**kw))
    except RequestError as err:
        return err.error
    return None


def test_valid_requests_pass():
    assert check(c.NBD_CMD_READ, 0, SIZE) is None
    assert check(c.NBD_CMD_WRITE, SIZE - 1, 1, c.NBD_CMD_FLAG_FUA) is None
    assert check(c.NBD_CMD_FLUSH) is None
    assert check(c.NBD_CMD_TRIM, 0, SIZE) is None
    assert check(c.NBD_CMD_CACHE, 0, 10, c.NBD_CMD_FLAG_FUA) is None
    flags = c.NBD_CMD_FLAG_NO_HOLE | c.NBD_CMD_FLAG_FAST_ZERO
    assert check(c.NBD_CMD_WRITE_ZEROES, 0, 4096, flags) is None
    assert check(c.NBD_CMD_BLOCK_STATUS, 0, SIZE, c.NBD_CMD_FLAG_REQ_ONE) is None
    assert check(c.NBD_CMD_READ, 0, 4096, c.NBD_CMD_FLAG_DF) is None
    assert check(c.NBD_CMD_READ, 0, 0) is None


def test_unknown_command_and_flags_are_einval():
    assert check(9) == c.NBD_EINVAL
    assert check(c.NBD_CMD_RESIZE) == c.NBD_EINVAL
    assert check(c.NBD_CMD_READ, 0, 1, 1 << 9) == c.NBD_EINVAL
    assert check(c.NBD_CMD_WRITE, 0, 1, c.NBD_CMD_FLAG_NO_HOLE) == c.NBD_EINVAL
    assert check(c.NBD_CMD_READ, 0, 1, c.NBD_CMD_FLAG_REQ_ONE) == c.NBD_EINVAL
    assert check(c.NBD_CMD_READ, 0, 1, c.NBD_CMD_FLAG_PAYLOAD_LEN) == c.NBD_EINVAL
    # DF only once structured replies are on
    assert check(c.NBD_CMD_READ, 0, 1, c.NBD_CMD_FLAG_DF, mode=Mode.SIMPLE) == c.NBD_EINVAL


def test_disc_parses_and_passes_in_both_header_sizes():
    """DISC: a header alone, no payload even when it claims a length, no range check;
    only FUA among the flags (any command may carry it)."""
    for mode, encode in ((Mode.STRUCTURED, compact), (Mode.EXTENDED, extended)):
        parser = RequestParser(mode)
        [req] = parse_all(parser, encode(c.NBD_CMD_DISC, cookie=5))
        assert (req.command, req.cookie, req.data, req.error) == (c.NBD_CMD_DISC, 5, None, None)
        assert not parser.partial
        assert check(c.NBD_CMD_DISC, mode=mode) is None
    assert check(c.NBD_CMD_DISC, SIZE * 2, 0) is None  # DISC names no range
    assert check(c.NBD_CMD_DISC, flags=c.NBD_CMD_FLAG_FUA) is None
    assert check(c.NBD_CMD_DISC, flags=c.NBD_CMD_FLAG_DF) == c.NBD_EINVAL


def test_past_the_end():
    assert check(c.NBD_CMD_READ, SIZE - 1, 2) == c.NBD_EINVAL
    assert check(c.NBD_CMD_WRITE, SIZE, 1) == c.NBD_ENOSPC
    assert check(c.NBD_CMD_WRITE_ZEROES, 0, SIZE + 1) == c.NBD_ENOSPC
    assert check(c.NBD_CMD_TRIM, 1, SIZE) == c.NBD_EINVAL
    assert check(c.NBD_CMD_BLOCK_STATUS, SIZE, 1) == c.NBD_EINVAL
    assert check(c.NBD_CMD_CACHE, 2**63, 2**63) == c.NBD_EINVAL


def test_read_only_refuses_changes_with_eperm():
    for cmd in (c.NBD_CMD_WRITE, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES):
        assert check(cmd, 0, 1, read_only=True) == c.NBD_EPERM
    assert check(c.NBD_CMD_READ, 0, 1, read_only=True) is None


def test_block_status_rules():
    assert check(c.NBD_CMD_BLOCK_STATUS, 0, 10, contexts=False) == c.NBD_EINVAL
    assert check(c.NBD_CMD_BLOCK_STATUS, 0, 0) == c.NBD_EINVAL


def test_oversized_read_is_einval():
    big = ExportLimits(size=1 << 30, read_only=False, mode=Mode.SIMPLE, has_contexts=False)
    with pytest.raises(RequestError) as err:
        check_request(Request(c.NBD_CMD_READ, 0, 1, 0, c.MAX_PAYLOAD + 1), big)
    assert err.value.error == c.NBD_EINVAL


def test_errno_mapping():
    import errno

    assert nbd_error(errno.EROFS) == c.NBD_EPERM
    assert nbd_error(errno.EDQUOT) == c.NBD_ENOSPC
    assert nbd_error(errno.EFBIG) == c.NBD_ENOSPC
    assert nbd_error(errno.ENOTSUP) == c.NBD_ENOTSUP
    assert nbd_error(errno.EBADF) == c.NBD_EIO
    assert nbd_error(None) == c.NBD_EIO


# --- replies -------------------------------------------------------------------------


def test_simple_replies():
    enc = ReplyEncoder(Mode.SIMPLE)
    assert b"".join(enc.ok(5)) == struct.pack(">IIQ", c.NBD_SIMPLE_REPLY_MAGIC, 0, 5)
    assert b"".join(enc.error(5, c.NBD_EIO, "ignored")) == struct.pack(
        ">IIQ", c.NBD_SIMPLE_REPLY_MAGIC, 5, 5
    )
    pieces = [ReadPiece(0, 3, b"abc"), ReadPiece(3, 2, None)]
    assert (
        b"".join(enc.read(9, 0, pieces))
        == struct.pack(">IIQ", c.NBD_SIMPLE_REPLY_MAGIC, 0, 9) + b"abc\0\0"
    )


def test_structured_read_chunks_data_and_holes():
    enc = ReplyEncoder(Mode.STRUCTURED)
    out = b"".join(enc.read(9, 100, [ReadPiece(100, 2, b"ab"), ReadPiece(102, 4096, None)]))
    expect = (
        struct.pack(">IHHQI", c.NBD_STRUCTURED_REPLY_MAGIC, 0, 1, 9, 10)
        + struct.pack(">Q", 100)
        + b"ab"
    )
    expect += struct.pack(">IHHQI", c.NBD_STRUCTURED_REPLY_MAGIC, 1, 2, 9, 12) + struct.pack(
        ">QI", 102, 4096
    )
    assert out == expect


def test_structured_zero_length_read_is_none_chunk():
    out = b"".join(ReplyEncoder(Mode.STRUCTURED).read(3, 0, []))
    assert out == struct.pack(">IHHQI", c.NBD_STRUCTURED_REPLY_MAGIC, 1, 0, 3, 0)


def test_structured_error_chunk_is_short_for_qemu():
    out = b"".join(ReplyEncoder(Mode.STRUCTURED).error(4, c.NBD_EINVAL, "é" * 2000))
    magic, flags, ctype, cookie, length = c.STRUCTURED_CHUNK.unpack_from(out)
    assert (magic, flags, ctype, cookie) == (c.NBD_STRUCTURED_REPLY_MAGIC, 1, 0x8001, 4)
    error, msglen = c.ERROR_HEADER.unpack_from(out, 20)
    assert error == c.NBD_EINVAL and length == 6 + msglen and length < 1000
    out[26:].decode("utf-8")  # never cut inside a character


def test_extended_replies_echo_the_offset():
    enc = ReplyEncoder(Mode.EXTENDED)
    ok = b"".join(enc.ok(7, 1 << 40))
    assert ok == struct.pack(">IHHQQQ", c.NBD_EXTENDED_REPLY_MAGIC, 1, 0, 7, 1 << 40, 0)
    data = b"".join(enc.read(7, 512, [ReadPiece(512, 4, b"data")]))
    assert data[:32] == struct.pack(">IHHQQQ", c.NBD_EXTENDED_REPLY_MAGIC, 1, 1, 7, 512, 12)
    assert data[32:] == struct.pack(">Q", 512) + b"data"


def test_block_status_compact_and_extended():
    answers = [(0, [Extent(4096, 3), Extent(512, 0)]), (2, [Extent(4608, 1)])]
    out = b"".join(ReplyEncoder(Mode.STRUCTURED).block_status(8, 0, answers))
    first = struct.pack(">I", 0) + struct.pack(">IIII", 4096, 3, 512, 0)
    second = struct.pack(">I", 2) + struct.pack(">II", 4608, 1)
    assert out == (
        struct.pack(">IHHQI", c.NBD_STRUCTURED_REPLY_MAGIC, 0, 5, 8, len(first))
        + first
        + struct.pack(">IHHQI", c.NBD_STRUCTURED_REPLY_MAGIC, 1, 5, 8, len(second))
        + second
    )
    ext = b"".join(ReplyEncoder(Mode.EXTENDED).block_status(8, 64, answers[:1]))
    payload = struct.pack(">II", 0, 2) + struct.pack(">QQQQ", 4096, 3, 512, 0)
    assert ext == struct.pack(">IHHQQQ", c.NBD_EXTENDED_REPLY_MAGIC, 1, 6, 8, 64, 40) + payload


def test_shape_extents_clips_merges_and_caps():
    ext = [Extent(100, 0), Extent(50, 0), Extent(0, 3), Extent(200, 3), Extent(100, 0)]
    assert shape_extents(ext, 1000, False) == [Extent(150, 0), Extent(200, 3), Extent(100, 0)]
    assert shape_extents(ext, 160, False) == [Extent(150, 0), Extent(10, 3)]
    assert shape_extents(ext, 160, True) == [Extent(150, 0)]
    assert shape_extents(ext, 1000, False, limit=2) == [Extent(150, 0), Extent(200, 3)]
    assert shape_extents([], 10, False) == []
