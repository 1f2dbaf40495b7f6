"""Property tests: every byte string is either parsed or rejected with ProtocolError.

Server side: the handshake (every TLS mode, with a simulated upgrade) and the request
parser; client side: the handshake and the reply parser, fed whatever a server might
send. Only the protocol's own errors may come out, never another exception.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdtrack.client.errors import ClientError, NBDProtocolError
from nbdtrack.client.handshake import ClientHandshake, Negotiate
from nbdtrack.client.transmission import ReplyParser
from nbdtrack.exports import Export, ExportRegistry
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.buffers import make_room
from nbdtrack.protocol.errors import ProtocolError, RequestError
from nbdtrack.protocol.events import Mode, StartTLS, TransmissionReady
from nbdtrack.protocol.handshake import Phase, ServerHandshake, TLSMode
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


@SETTINGS
@given(st.data())
def test_request_parser_in_place_payloads_match(data):
    """Large payloads filled in place give exactly what the buffered path gives."""
    mode = data.draw(st.sampled_from(list(Mode)))
    stream = data.draw(request_streams(mode))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    direct = data.draw(st.integers(1, 300))

    def parse(threshold: int, chunks: list[int]):
        parser = RequestParser(mode, max_payload=256, direct_payload=threshold)
        out = []

        def feed(part: bytes) -> None:
            parser.receive_data(part)
            while (req := parser.next_request()) is not None:
                out.append((req.command, req.cookie, req.length, bytes(req.data or b"")))

        try:
            feed_in_chunks(feed, stream, [x for x in chunks if x <= len(stream)])
        except ProtocolError:
            return None, out
        return parser.partial, out

    assert parse(direct, cuts) == parse(1 << 30, [])


@SETTINGS
@given(st.data())
def test_request_parser_buffer_api_matches_receive_data(data):
    """Fed as an asyncio.BufferedProtocol feeds it (get_buffer, recv_into at most the
    buffer's size, buffer_updated), the parser gives what receive_data gives, payloads
    received in place (into recycled buffers too) included, and never offers an empty
    buffer (recv_into would read 0 bytes: end of file)."""
    mode = data.draw(st.sampled_from(list(Mode)))
    stream = data.draw(request_streams(mode))
    direct = data.draw(st.integers(1, 300))
    reads = data.draw(st.lists(st.integers(1, 400), min_size=1, max_size=20))

    def parse(use_buffers: bool):
        parser = RequestParser(mode, max_payload=256, direct_payload=direct)
        out = []
        pos = 0
        try:
            for n in reads * (len(stream) + 1):
                if pos >= len(stream):
                    break
                if use_buffers:
                    buf = parser.get_buffer(-1)
                    assert len(buf) > 0
                    take = min(n, len(buf), len(stream) - pos)
                    buf[:take] = stream[pos : pos + take]
                    parser.buffer_updated(take)
                else:
                    take = min(n, len(stream) - pos)
                    parser.receive_data(stream[pos : pos + take])
                pos += take
                while (req := parser.next_request()) is not None:
                    out.append((req.command, req.cookie, req.length, bytes(req.data or b"")))
                    if use_buffers and req.data is not None:
                        parser.recycle(req.data)  # as the server does once it is written
        except ProtocolError:
            return None, out
        return parser.partial, out

    assert parse(True) == parse(False)


# --- the handshake with TLS modes -----------------------------------------------------------


def tls_registry() -> ExportRegistry:
    public = Export("public", MemoryBackend(1 << 20), "p")
    secret = Export("secret", MemoryBackend(1 << 20), "s")
    secret.tls_only = True
    return ExportRegistry([public, secret])


tls_options = st.sampled_from(
    [c.NBD_OPT_STARTTLS] * 3 + list(range(0, 13)) + [0x7FFFFFFF]
)


@st.composite
def tls_option_streams(draw) -> list[bytes]:
    """Options (well framed, with plausible data) as separate sends, sometimes garbage."""
    parts = [struct.pack(">I", draw(st.sampled_from([1, 3, 3, 3, 0, 2])))]
    names = st.sampled_from([b"public", b"secret", b"", b"nope", b"../secret"])
    for _ in range(draw(st.integers(0, 8))):
        opt = draw(tls_options)
        if opt in (c.NBD_OPT_GO, c.NBD_OPT_INFO):
            name = draw(names)
            data = struct.pack(">I", len(name)) + name + b"\0\0"
        elif opt in (c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT):
            name = draw(names)
            data = struct.pack(">I", len(name)) + name + b"\0\0\0\0"
        elif opt == c.NBD_OPT_EXPORT_NAME:
            data = draw(names)
        else:
            data = b"" if draw(st.integers(0, 4)) else draw(st.binary(max_size=16))
        if draw(st.integers(0, 15)) == 0:
            parts.append(draw(st.binary(max_size=24)))
        else:
            parts.append(c.OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data)) + data)
    return parts


def option_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Parse what the server sent after its greeting; asserts every frame is well formed."""
    assert out[:8] == b"NBDMAGIC"
    pos, replies = 18, []
    while pos < len(out):
        magic = c.U64.unpack_from(out, pos)[0] if len(out) - pos >= 8 else None
        if magic != c.OPTION_REPLY_MAGIC:  # the raw EXPORT_NAME reply ends the handshake
            assert len(out) - pos in (10, 134)
            break
        _, opt, rtype, length = c.OPTION_REPLY_HEADER.unpack_from(out, pos)
        payload = out[pos + 20 : pos + 20 + length]
        assert len(payload) == length
        if rtype == c.NBD_REP_ACK:
            assert length == 0
        replies.append((opt, rtype, payload))
        pos += 20 + length
    return replies


@SETTINGS
@given(st.sampled_from(list(TLSMode)), tls_option_streams(), st.booleans())
def test_handshake_with_tls_modes(mode, parts, upgrade):
    hs = ServerHandshake(tls_registry(), tls=mode)
    out = bytearray(hs.data_to_send())
    tls_at = None  # index in the reply list where TLS started
    events = []
    try:
        for part in parts:
            hs.receive_data(part)
            out += hs.data_to_send()
            while (event := hs.next_event()) is not None:
                events.append(event)
                if isinstance(event, StartTLS):
                    assert hs.phase is Phase.STARTING_TLS
                    if not upgrade:  # plaintext after STARTTLS must be refused
                        try:
                            hs.receive_data(b"\x16\x03\x01")
                        except ProtocolError:
                            return
                        raise AssertionError("plaintext accepted after STARTTLS")
                    tls_at = len(option_replies(bytes(out)))
                    hs.tls_started()
                    assert hs.mode is Mode.SIMPLE and hs.tls_active
    except ProtocolError:
        pass
    out += hs.data_to_send()
    replies = option_replies(bytes(out))
    before = replies if tls_at is None else replies[:tls_at]
    if mode is TLSMode.OFF:
        assert not any(isinstance(e, StartTLS) for e in events)
        assert all(r != c.NBD_REP_ERR_TLS_REQD for _, r, _ in replies)
    if mode is TLSMode.REQUIRE:
        for opt, rtype, _ in before:  # nothing but refusals, STARTTLS and ABORT
            assert rtype == c.NBD_REP_ERR_TLS_REQD or opt in (
                c.NBD_OPT_STARTTLS,
                c.NBD_OPT_ABORT,
            ), (opt, rtype)
    if mode is not TLSMode.OFF:  # no TLS-only export shows before TLS
        for _, rtype, payload in before:
            assert b"secret" not in payload or rtype & c.NBD_REP_FLAG_ERROR
    for event in events:
        if isinstance(event, TransmissionReady):
            secret = mode is TLSMode.ON and event.export_name == "secret"
            if mode is TLSMode.REQUIRE or secret:
                assert hs.tls_active


# --- the client's parsers: whatever a server sends ---------------------------------------------


@st.composite
def server_streams(draw) -> list[bytes]:
    greeting = c.GREETING.pack(
        c.NBDMAGIC,
        draw(st.sampled_from([c.IHAVEOPT, c.IHAVEOPT, c.CLISERV_MAGIC, 0])),
        draw(st.sampled_from([3, 3, 1, 0, 0xFFFF])),
    )
    parts = [greeting] if draw(st.integers(0, 9)) else [draw(st.binary(max_size=30))]
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.binary(max_size=40)))
            continue
        rtype = draw(
            st.sampled_from(
                [c.NBD_REP_ACK, c.NBD_REP_INFO, c.NBD_REP_SERVER, c.NBD_REP_META_CONTEXT]
                + [c.NBD_REP_ERR_UNSUP, c.NBD_REP_ERR_TLS_REQD, c.NBD_REP_ERR_POLICY, 77]
            )
        )
        payload = draw(st.binary(max_size=20))
        if rtype == c.NBD_REP_INFO and draw(st.booleans()):
            size, flags = draw(st.integers(0, 1 << 30)), draw(st.integers(0, 0xFFFF))
            payload = c.INFO_EXPORT.pack(0, size, flags)
        opt = draw(st.sampled_from([c.NBD_OPT_STARTTLS, c.NBD_OPT_EXTENDED_HEADERS, 7, 8, 10]))
        head = c.OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, opt, rtype, len(payload))
        parts.append(head + payload)
    return parts


@SETTINGS
@given(server_streams(), st.booleans(), st.booleans())
def test_client_handshake_parses_or_rejects(parts, starttls, go):
    hs = ClientHandshake(Negotiate("disk", meta_contexts=("base:allocation",), go=go), starttls)
    try:
        for part in parts:
            hs.receive_data(part)
            hs.data_to_send()
            if hs.tls_requested:
                hs.tls_established()
    except ClientError:
        return
    assert hs.done or not hs.tls_requested


@st.composite
def reply_streams(draw, mode: Mode) -> list[bytes]:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        cookie = draw(st.integers(1, 4) | st.integers(0, 2**64 - 1))
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.binary(max_size=40)))
        elif mode is Mode.SIMPLE or draw(st.integers(0, 4)) == 0:
            error = draw(st.sampled_from([0, 0, 5, 22]))
            parts.append(c.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, error, cookie))
            parts.append(draw(st.binary(max_size=24)))
        else:
            ctype = draw(st.sampled_from([0, 1, 2, 5, 6, c.NBD_REPLY_TYPE_ERROR, 32769 + 1, 9]))
            flags = draw(st.sampled_from([0, 1, 1, 3]))
            payload = draw(st.binary(max_size=40))
            if mode is Mode.EXTENDED:
                head = c.EXTENDED_CHUNK.pack(
                    c.NBD_EXTENDED_REPLY_MAGIC, flags, ctype, cookie,
                    draw(st.integers(0, 8192)), len(payload),
                )  # fmt: skip
            else:
                head = c.STRUCTURED_CHUNK.pack(
                    c.NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, cookie, len(payload)
                )
            parts.append(head + payload)
    return parts


@SETTINGS
@given(st.data())
def test_client_reply_parser_parses_or_rejects(data):
    mode = data.draw(st.sampled_from(list(Mode)))
    parser = ReplyParser(mode, 1 << 20, [0, 1])
    commands = (c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_READ)
    for cookie, command in enumerate(commands, start=1):
        length = 16 if command == c.NBD_CMD_READ else 8192
        into = None
        if command == c.NBD_CMD_READ and data.draw(st.booleans()):
            into = memoryview(bytearray(length))  # the caller's buffer (pread_into)
        parser.expect(cookie, command, 0, 4096 * cookie, length, into)
    try:
        for part in data.draw(reply_streams(mode)):
            parser.receive_data(part)
            while parser.next_reply() is not None:
                pass
    except NBDProtocolError:
        pass


@SETTINGS
@given(st.data())
def test_make_room_keeps_the_unparsed_bytes_and_never_resizes_a_buffer_in_use(data):
    """Whatever the receive buffer holds, the unparsed bytes come out the same, at least
    ``need`` bytes are free after them, and the buffer is never resized in place (a view
    of it, as a socket's ``recv_into`` holds, stays valid)."""
    size = data.draw(st.integers(0, 600))
    buf = bytearray(data.draw(st.binary(min_size=size, max_size=size)))
    end = data.draw(st.integers(0, size))
    pos = data.draw(st.integers(0, end))
    need = data.draw(st.integers(0, 700))
    usual = data.draw(st.integers(1, 400))
    unparsed = bytes(buf[pos:end])
    with memoryview(buf) as in_use:
        new, new_pos, new_end = make_room(buf, pos, end, need, usual)
        assert len(in_use) == size  # the old buffer was not resized under its view
    assert bytes(new[new_pos:new_end]) == unparsed
    assert len(new) - new_end >= need
    if not unparsed and size > usual >= need:
        assert len(new) == usual  # an emptied large buffer goes back to the usual size
