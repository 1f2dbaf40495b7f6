"""Property tests: every byte string is either parsed or rejected with ProtocolError."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdtrack.exports import Export, ExportRegistry
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.errors import ProtocolError, RequestError
from nbdtrack.protocol.events import Mode
from nbdtrack.protocol.handshake import ServerHandshake
from nbdtrack.protocol.requests import ExportLimits, RequestParser, check_request
from nbdtrack.storage.memory import MemoryBackend

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def registry() -> ExportRegistry:
    return ExportRegistry([Export("disk", MemoryBackend(1 << 20), "d")])


option_codes = st.sampled_from(list(range(0, 13)) + [0x7FFFFFFF, 0xFFFFFFFF])


@st.composite
def option_streams(draw) -> bytes:
    """Mostly well-framed options with random data, sometimes raw garbage."""
    parts = [struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 7])))]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            data = draw(st.binary(max_size=64))
            length = len(data) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1))
            magic = c.IHAVEOPT if draw(st.integers(0, 19)) else draw(st.integers(0, 2**64 - 1))
            parts.append(c.OPTION_HEADER.pack(magic, draw(option_codes), length) + data)
        else:
            parts.append(draw(st.binary(max_size=40)))
    return b"".join(parts)


def feed_in_chunks(feed, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted(cuts):
        feed(data[pos:cut])
        pos = cut
    feed(data[pos:])


@SETTINGS
@given(option_streams(), st.lists(st.integers(0, 500), max_size=5))
def test_handshake_parses_or_rejects(stream, cuts):
    hs = ServerHandshake(registry())
    try:
        feed_in_chunks(hs.receive_data, stream, [x for x in cuts if x <= len(stream)])
    except ProtocolError:
        return
    out = hs.data_to_send()
    assert out[:8] == b"NBDMAGIC"


@st.composite
def request_streams(draw, mode: Mode) -> bytes:
    header = c.EXTENDED_REQUEST if mode is Mode.EXTENDED else c.REQUEST
    magic = c.NBD_EXTENDED_REQUEST_MAGIC if mode is Mode.EXTENDED else c.NBD_REQUEST_MAGIC
    max_len = 2**64 - 1 if mode is Mode.EXTENDED else 2**32 - 1
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        cmd = draw(st.integers(0, 10) | st.integers(0, 0xFFFF))
        flags = draw(st.integers(0, 0x3F) | st.integers(0, 0xFFFF))
        length = draw(st.integers(0, 300) | st.integers(0, max_len))
        if cmd == c.NBD_CMD_WRITE or flags & c.NBD_CMD_FLAG_PAYLOAD_LEN:
            length = draw(st.integers(0, 300))
            payload = draw(st.binary(min_size=length, max_size=length))
        else:
            payload = b""
        m = magic if draw(st.integers(0, 19)) else draw(st.integers(0, 2**32 - 1))
        offset = draw(st.integers(0, 2**64 - 1))
        parts.append(header.pack(m, flags, cmd, draw(st.integers(0, 2**64 - 1)), offset, length))
        parts.append(payload)
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=40)))
    return b"".join(parts)


def run_parser(mode: Mode, stream: bytes, cuts: list[int]):
    parser = RequestParser(mode, max_payload=256)
    limits = ExportLimits(size=1 << 20, read_only=False, mode=mode, has_contexts=True)
    requests = []

    def feed(data: bytes) -> None:
        parser.receive_data(data)
        while (req := parser.next_request()) is not None:
            requests.append(req)
            try:
                check_request(req, limits)
            except RequestError as err:
                assert err.error in (c.NBD_EINVAL, c.NBD_ENOSPC, c.NBD_EPERM)

    try:
        feed_in_chunks(feed, stream, [x for x in cuts if x <= len(stream)])
    except ProtocolError:
        return None
    return [(r.command, r.flags, r.cookie, r.offset, r.length, r.data) for r in requests]


@SETTINGS
@given(st.data())
def test_request_parser_parses_or_rejects_and_ignores_chunking(data):
    mode = data.draw(st.sampled_from(list(Mode)))
    stream = data.draw(request_streams(mode))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    whole = run_parser(mode, stream, [])
    split = run_parser(mode, stream, cuts)
    assert whole == split
