"""The sans-IO handshake, byte by byte: every option, and malformed input."""

from __future__ import annotations

import struct

import pytest

from nbdtrack.exports import Export, ExportRegistry
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.errors import ProtocolError
from nbdtrack.protocol.events import HandshakeAborted, Mode, StartTLS, TransmissionReady
from nbdtrack.protocol.handshake import MAX_OPTION_LENGTH, Phase, ServerHandshake, TLSMode
from nbdtrack.storage.memory import MemoryBackend

SIZE = 1024 * 1024
BASE_FLAGS = (
    c.NBD_FLAG_HAS_FLAGS
    | c.NBD_FLAG_SEND_FLUSH
    | c.NBD_FLAG_SEND_FUA
    | c.NBD_FLAG_SEND_CACHE
    | c.NBD_FLAG_CAN_MULTI_CONN
    | c.NBD_FLAG_SEND_TRIM
    | c.NBD_FLAG_SEND_WRITE_ZEROES
    | c.NBD_FLAG_SEND_FAST_ZERO
)


def registry() -> ExportRegistry:
    return ExportRegistry(
        [
            Export("disk", MemoryBackend(SIZE), "the disk"),
            Export("ro", MemoryBackend(2 * SIZE), read_only=True),
        ]
    )


def option(opt: int, data: bytes = b"") -> bytes:
    return c.OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data)) + data


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str, *infos: int) -> bytes:
    return (
        string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) for each option reply in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = c.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == c.OPTION_REPLY_MAGIC
        pos += c.OPTION_REPLY_HEADER.size
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def negotiate(flags: int = c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES):
    hs = ServerHandshake(registry())
    greeting = hs.data_to_send()
    assert greeting == struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, 3)
    hs.receive_data(struct.pack(">I", flags))
    assert hs.data_to_send() == b""
    return hs


def send(hs: ServerHandshake, data: bytes) -> list[tuple[int, int, bytes]]:
    hs.receive_data(data)
    return parse_replies(hs.data_to_send())


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    hs = ServerHandshake(registry())
    out = hs.data_to_send()
    assert len(out) == 18
    assert out[:8] == b"NBDMAGIC" and out[8:16] == b"IHAVEOPT"
    assert out[16:] == b"\x00\x03"


def test_unknown_client_flags_disconnect():
    hs = ServerHandshake(registry())
    with pytest.raises(ProtocolError, match="client flags"):
        hs.receive_data(struct.pack(">I", 0x4))


def test_client_flags_may_arrive_byte_by_byte():
    hs = ServerHandshake(registry())
    hs.data_to_send()
    for b in struct.pack(">I", 1):
        hs.receive_data(bytes([b]))
    assert hs.phase is Phase.OPTIONS


def test_export_name_with_padding():
    hs = negotiate(flags=c.NBD_FLAG_C_FIXED_NEWSTYLE)
    hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b"disk"))
    out = hs.data_to_send()
    assert len(out) == 134
    size, flags = c.EXPORT_NAME_REPLY.unpack_from(out)
    assert size == SIZE and flags == BASE_FLAGS
    assert out[10:] == bytes(124)
    assert hs.next_event() == TransmissionReady("disk", Mode.SIMPLE, ())


def test_export_name_without_padding_when_both_agree():
    hs = negotiate()
    hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b""))
    out = hs.data_to_send()
    assert len(out) == 10  # the empty name reaches the default export
    event = hs.next_event()
    assert isinstance(event, TransmissionReady) and event.export_name == "disk"


def test_export_name_unknown_closes():
    hs = negotiate()
    with pytest.raises(ProtocolError, match="not present"):
        hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b"nope"))


def test_plain_newstyle_client_may_only_send_export_name():
    hs = negotiate(flags=0)
    with pytest.raises(ProtocolError):
        hs.receive_data(option(c.NBD_OPT_LIST))
    hs = negotiate(flags=0)
    hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b"ro"))
    out = hs.data_to_send()
    assert len(out) == 134
    _, flags = c.EXPORT_NAME_REPLY.unpack_from(out)
    assert flags & c.NBD_FLAG_READ_ONLY
    assert not flags & c.NBD_FLAG_SEND_TRIM


def test_bad_option_magic_disconnects():
    hs = negotiate()
    with pytest.raises(ProtocolError, match="magic"):
        hs.receive_data(struct.pack(">QII", 0x1234, c.NBD_OPT_LIST, 0))


def test_abort_acks_then_ends():
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_ABORT))
    assert replies == [(c.NBD_OPT_ABORT, c.NBD_REP_ACK, b"")]
    assert isinstance(hs.next_event(), HandshakeAborted)
    assert hs.phase is Phase.ABORTED


def test_list_names_and_descriptions():
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_LIST))
    assert replies == [
        (c.NBD_OPT_LIST, c.NBD_REP_SERVER, string("disk") + b"the disk"),
        (c.NBD_OPT_LIST, c.NBD_REP_SERVER, string("ro")),
        (c.NBD_OPT_LIST, c.NBD_REP_ACK, b""),
    ]


def test_list_with_data_is_invalid():
    hs = negotiate()
    [(opt, rtype, _)] = send(hs, option(c.NBD_OPT_LIST, b"x"))
    assert (opt, rtype) == (c.NBD_OPT_LIST, c.NBD_REP_ERR_INVALID)


@pytest.mark.parametrize("opt", [c.NBD_OPT_PEEK_EXPORT, 12, 0xFFFF, 0x7FFFFFFF])
def test_unknown_option_is_drained_and_unsupported(opt):
    hs = negotiate()
    replies = send(hs, option(opt, b"some data") + option(c.NBD_OPT_LIST))
    assert replies[0][:2] == (opt, c.NBD_REP_ERR_UNSUP)
    assert replies[-1] == (c.NBD_OPT_LIST, c.NBD_REP_ACK, b"")


def test_starttls_refused_by_policy_without_tls():
    hs = negotiate()
    [(opt, rtype, msg)] = send(hs, option(c.NBD_OPT_STARTTLS))
    assert rtype == c.NBD_REP_ERR_POLICY and b"TLS" in msg


def test_info_sends_block_size_before_export_and_stays():
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_INFO, info_data("disk", c.NBD_INFO_NAME)))
    assert [r[1] for r in replies] == [c.NBD_REP_INFO] * 4 + [c.NBD_REP_ACK]
    assert replies[0][2] == struct.pack(">H", c.NBD_INFO_NAME) + b"disk"
    assert replies[1][2] == struct.pack(">H", c.NBD_INFO_DESCRIPTION) + b"the disk"
    assert replies[2][2] == c.INFO_BLOCK_SIZE.pack(c.NBD_INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
    assert replies[3][2] == c.INFO_EXPORT.pack(c.NBD_INFO_EXPORT, SIZE, BASE_FLAGS)
    assert hs.phase is Phase.OPTIONS and hs.next_event() is None


def test_go_reports_what_info_reported_and_starts_transmission():
    hs = negotiate()
    send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))
    info = send(hs, option(c.NBD_OPT_INFO, info_data("ro", c.NBD_INFO_BLOCK_SIZE)))
    go = send(hs, option(c.NBD_OPT_GO, info_data("ro", c.NBD_INFO_BLOCK_SIZE)))
    assert [(r[1], r[2]) for r in info] == [(r[1], r[2]) for r in go]
    _, size, flags = c.INFO_EXPORT.unpack(go[-2][2])
    assert size == 2 * SIZE
    assert flags & c.NBD_FLAG_READ_ONLY and flags & c.NBD_FLAG_SEND_DF
    assert hs.next_event() == TransmissionReady("ro", Mode.STRUCTURED, ())
    assert hs.phase is Phase.DONE


def test_go_unknown_export_is_reported_and_negotiation_goes_on():
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_GO, info_data("nope")))
    assert [r[1] for r in replies] == [c.NBD_REP_ERR_UNKNOWN]
    assert hs.phase is Phase.OPTIONS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        string("disk"),  # count missing
        string("disk") + b"\x00\x01",  # one request announced, none given
        string("disk") + b"\x00\x00\x00",  # a byte too many
        b"\x00\x00\x00\x10disk\x00\x00",  # name length past the data
        string(b"di\x00sk") + b"\x00\x00",  # NUL in the name
        string(b"\xff\xfe") + b"\x00\x00",  # not UTF-8
        string("x" * 4097) + b"\x00\x00",  # name too long
    ],
)
def test_go_with_bad_lengths_is_invalid(data):
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_GO, data))
    assert [r[1] for r in replies] == [c.NBD_REP_ERR_INVALID]
    assert hs.phase is Phase.OPTIONS


def test_structured_reply_twice_is_invalid():
    hs = negotiate()
    assert send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))[0][1] == c.NBD_REP_ACK
    assert send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))[0][1] == c.NBD_REP_ERR_INVALID
    assert hs.mode is Mode.STRUCTURED


def test_extended_headers_then_structured_reply_requires_extended():
    hs = negotiate()
    assert send(hs, option(c.NBD_OPT_EXTENDED_HEADERS))[0][1] == c.NBD_REP_ACK
    assert send(hs, option(c.NBD_OPT_EXTENDED_HEADERS))[0][1] == c.NBD_REP_ERR_INVALID
    assert send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))[0][1] == c.NBD_REP_ERR_EXT_HEADER_REQD
    assert hs.mode is Mode.EXTENDED
    with pytest.raises(ProtocolError, match="extended"):
        hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b"disk"))


def test_extended_after_structured_upgrades():
    hs = negotiate()
    send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))
    assert send(hs, option(c.NBD_OPT_EXTENDED_HEADERS))[0][1] == c.NBD_REP_ACK
    send(hs, option(c.NBD_OPT_GO, info_data("disk")))
    assert hs.next_event().mode is Mode.EXTENDED


@pytest.mark.parametrize("opt", [c.NBD_OPT_STRUCTURED_REPLY, c.NBD_OPT_EXTENDED_HEADERS])
def test_state_options_take_no_data(opt):
    hs = negotiate()
    assert send(hs, option(opt, b"\x00"))[0][1] == c.NBD_REP_ERR_INVALID
    assert hs.mode is Mode.SIMPLE


def test_list_meta_context_rules():
    hs = negotiate()
    lst = c.NBD_OPT_LIST_META_CONTEXT
    every = send(hs, option(lst, meta_data("disk")))
    assert every == [
        (lst, c.NBD_REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
        (lst, c.NBD_REP_ACK, b""),
    ]
    assert send(hs, option(lst, meta_data("disk", "base:"))) == every
    assert send(hs, option(lst, meta_data("disk", "base:allocation"))) == every
    assert send(hs, option(lst, meta_data("disk", "qemu:", "x-foo:bar"))) == [
        (lst, c.NBD_REP_ACK, b"")
    ]
    assert send(hs, option(lst, meta_data("nope")))[0][1] == c.NBD_REP_ERR_UNKNOWN


def test_set_meta_context_needs_structured_replies():
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    assert [r[1] for r in replies] == [c.NBD_REP_ERR_INVALID]


def test_set_meta_context_selects_exact_names_for_that_export():
    hs = negotiate()
    send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))
    st = c.NBD_OPT_SET_META_CONTEXT
    assert send(hs, option(st, meta_data("disk", "base:"))) == [(st, c.NBD_REP_ACK, b"")]
    replies = send(hs, option(st, meta_data("disk", "base:allocation", "qemu:dirty-bitmap:x")))
    assert replies == [
        (st, c.NBD_REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
        (st, c.NBD_REP_ACK, b""),
    ]
    send(hs, option(c.NBD_OPT_GO, info_data("disk")))
    event = hs.next_event()
    assert [ctx.name for ctx in event.contexts] == ["base:allocation"]
    assert event.contexts[0].id == 0


def test_meta_context_selection_is_forgotten_for_another_export():
    hs = negotiate()
    send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))
    send(hs, option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    send(hs, option(c.NBD_OPT_GO, info_data("ro")))
    assert hs.next_event().contexts == ()


def test_failed_set_meta_context_clears_the_selection():
    hs = negotiate()
    send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))
    send(hs, option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    bad = send(hs, option(c.NBD_OPT_SET_META_CONTEXT, string("disk") + b"\x00\x00\x00\x05"))
    assert bad[0][1] == c.NBD_REP_ERR_INVALID
    send(hs, option(c.NBD_OPT_GO, info_data("disk")))
    assert hs.next_event().contexts == ()


@pytest.mark.parametrize(
    "data",
    [
        string("disk"),  # query count missing
        string("disk") + struct.pack(">I", 2) + string("base:allocation"),  # one query missing
        string("disk") + struct.pack(">I", 1) + string("base:allocation") + b"!",
        string("disk") + struct.pack(">I", 1) + b"\x00\x00\x10\x00abc",
    ],
)
def test_meta_context_bad_lengths_are_invalid(data):
    hs = negotiate()
    replies = send(hs, option(c.NBD_OPT_LIST_META_CONTEXT, data))
    assert [r[1] for r in replies] == [c.NBD_REP_ERR_INVALID]


def test_oversized_option_is_drained_and_refused():
    hs = negotiate()
    length = MAX_OPTION_LENGTH + 1
    hs.receive_data(c.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_LIST_META_CONTEXT, length))
    for _ in range(length // 65536):
        hs.receive_data(bytes(65536))
        assert hs.data_to_send() == b""
    replies = send(hs, bytes(length % 65536) + option(c.NBD_OPT_LIST))
    assert replies[0][1] == c.NBD_REP_ERR_TOO_BIG
    assert replies[-1] == (c.NBD_OPT_LIST, c.NBD_REP_ACK, b"")


def test_oversized_export_name_disconnects():
    hs = negotiate()
    with pytest.raises(ProtocolError):
        hs.receive_data(
            c.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_EXPORT_NAME, MAX_OPTION_LENGTH + 1)
        )


def test_options_split_at_every_byte_give_the_same_replies():
    stream = (
        option(c.NBD_OPT_LIST)
        + option(c.NBD_OPT_STRUCTURED_REPLY)
        + option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation"))
        + option(c.NBD_OPT_GO, info_data("disk", c.NBD_INFO_NAME))
    )
    whole = negotiate()
    whole.receive_data(stream)
    expected = whole.data_to_send()
    piecewise = negotiate()
    out = b""
    for b in stream:
        piecewise.receive_data(bytes([b]))
        out += piecewise.data_to_send()
    assert out == expected
    assert piecewise.next_event() == whole.next_event()


def test_bytes_after_go_are_kept_for_transmission():
    hs = negotiate()
    request = c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, 1, 0, 512)
    hs.receive_data(option(c.NBD_OPT_GO, info_data("disk")) + request)
    assert isinstance(hs.next_event(), TransmissionReady)
    assert hs.trailing_data == request


# --- TLS modes, limits and admission ------------------------------------------------------


def tls_handshake(mode: TLSMode, **kw) -> ServerHandshake:
    exports = registry()
    secret = Export("secret", MemoryBackend(SIZE), "tls only")
    secret.tls_only = True
    exports.add(secret)
    hs = ServerHandshake(exports, tls=mode, **kw)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3))
    return hs


def start_tls(hs: ServerHandshake) -> None:
    assert send(hs, option(c.NBD_OPT_STARTTLS)) == [(c.NBD_OPT_STARTTLS, c.NBD_REP_ACK, b"")]
    assert isinstance(hs.next_event(), StartTLS) and hs.phase is Phase.STARTING_TLS
    hs.tls_started()


def test_forced_tls_refuses_everything_before_starttls():
    hs = tls_handshake(TLSMode.REQUIRE, max_option_length=1024)
    for opt, data in [
        (c.NBD_OPT_LIST, b""),
        (c.NBD_OPT_INFO, info_data("disk")),
        (c.NBD_OPT_GO, info_data("")),
        (c.NBD_OPT_STRUCTURED_REPLY, b""),
        (c.NBD_OPT_EXTENDED_HEADERS, b""),
        (c.NBD_OPT_LIST_META_CONTEXT, meta_data("disk")),
        (c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")),
        (c.NBD_OPT_PEEK_EXPORT, b""),
        (99, b"whatever"),
        (c.NBD_OPT_LIST, b"x" * 2000),  # drained: still ERR_TLS_REQD, not ERR_TOO_BIG
    ]:
        [(echoed, rtype, _)] = send(hs, option(opt, data))
        assert (echoed, rtype) == (opt, c.NBD_REP_ERR_TLS_REQD)
    start_tls(hs)
    replies = send(hs, option(c.NBD_OPT_LIST))
    assert [r[1] for r in replies] == [c.NBD_REP_SERVER] * 3 + [c.NBD_REP_ACK]
    assert send(hs, option(c.NBD_OPT_STARTTLS))[0][1] == c.NBD_REP_ERR_INVALID  # once only
    hs.receive_data(option(c.NBD_OPT_GO, info_data("secret")))
    assert isinstance(hs.next_event(), TransmissionReady)


def test_forced_tls_export_name_closes_and_abort_is_allowed():
    hs = tls_handshake(TLSMode.REQUIRE)
    with pytest.raises(ProtocolError, match="before TLS"):
        hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b"disk"))
    hs = tls_handshake(TLSMode.REQUIRE)
    assert send(hs, option(c.NBD_OPT_ABORT)) == [(c.NBD_OPT_ABORT, c.NBD_REP_ACK, b"")]


def test_starttls_wipes_what_was_negotiated():
    hs = tls_handshake(TLSMode.ON)
    send(hs, option(c.NBD_OPT_STRUCTURED_REPLY))
    send(hs, option(c.NBD_OPT_SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    assert hs.mode is Mode.STRUCTURED
    start_tls(hs)
    assert hs.mode is Mode.SIMPLE and hs.tls_active
    hs.receive_data(option(c.NBD_OPT_GO, info_data("disk")))
    ready = hs.next_event()
    assert isinstance(ready, TransmissionReady)
    assert ready.mode is Mode.SIMPLE and ready.contexts == ()


def test_starttls_refusals_and_plaintext_after_it():
    hs = tls_handshake(TLSMode.ON)
    assert send(hs, option(c.NBD_OPT_STARTTLS, b"x"))[0][1] == c.NBD_REP_ERR_INVALID
    with pytest.raises(ProtocolError, match="after NBD_OPT_STARTTLS"):
        hs.receive_data(option(c.NBD_OPT_STARTTLS) + option(c.NBD_OPT_LIST))
    hs = tls_handshake(TLSMode.ON)
    send(hs, option(c.NBD_OPT_STARTTLS))
    with pytest.raises(ProtocolError, match="plaintext"):
        hs.receive_data(b"\x16\x03\x01")
    with pytest.raises(ProtocolError):
        tls_handshake(TLSMode.ON).tls_started()  # no STARTTLS in progress


def test_selective_tls_hides_and_refuses_tls_only_exports():
    hs = tls_handshake(TLSMode.ON)
    names = [p[4:] for _, r, p in send(hs, option(c.NBD_OPT_LIST)) if r == c.NBD_REP_SERVER]
    assert not any(n.startswith(b"secret") for n in names) and len(names) == 2
    for opt, data in [
        (c.NBD_OPT_INFO, info_data("secret")),
        (c.NBD_OPT_GO, info_data("secret")),
        (c.NBD_OPT_LIST_META_CONTEXT, meta_data("secret")),
    ]:
        assert send(hs, option(opt, data))[-1][1] == c.NBD_REP_ERR_TLS_REQD
    assert send(hs, option(c.NBD_OPT_INFO, info_data("disk")))[-1][1] == c.NBD_REP_ACK
    with pytest.raises(ProtocolError, match="requires TLS"):
        hs.receive_data(option(c.NBD_OPT_EXPORT_NAME, b"secret"))


def test_admission_refusal_and_name_cap():
    full = {"disk"}
    hs = tls_handshake(
        TLSMode.OFF,
        max_name_length=8,
        admit=lambda e: "too many" if e.name in full else None,
    )
    assert send(hs, option(c.NBD_OPT_INFO, info_data("disk")))[-1][1] == c.NBD_REP_ACK
    [(_, rtype, message)] = send(hs, option(c.NBD_OPT_GO, info_data("disk")))
    assert rtype == c.NBD_REP_ERR_POLICY and message == b"too many"
    [(_, rtype, _)] = send(hs, option(c.NBD_OPT_GO, info_data("d" * 9)))
    assert rtype == c.NBD_REP_ERR_INVALID
    full.clear()
    hs.receive_data(option(c.NBD_OPT_GO, info_data("disk")))
    assert isinstance(hs.next_event(), TransmissionReady)
