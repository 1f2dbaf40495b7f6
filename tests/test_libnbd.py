"""Interoperability with libnbd 1.14 (Debian's python3-libnbd), strict mode on.

Every handle starts with all of libnbd's strict checks enabled, so libnbd itself
polices what the server advertises and answers. Where a test wants the *server* to
refuse something, it turns off exactly the strict flag that would have let libnbd
refuse it client-side, and checks that the refusal really came over the wire: libnbd
says "command failed" only for an error reply, and with structured replies the
server's error message (which libnbd logs at debug level) must be there too.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import nbd
import pytest

MiB = 1024 * 1024
SIZE = 64 * MiB
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO
STRICT_ALL = (
    nbd.STRICT_COMMANDS
    | nbd.STRICT_FLAGS
    | nbd.STRICT_BOUNDS
    | nbd.STRICT_ZERO_SIZE
    | nbd.STRICT_ALIGN
)
SERVER_MESSAGE = "structured error server message: "


class Client:
    """A libnbd handle in strict mode that also collects the server's error messages."""

    def __init__(
        self,
        strict: int = STRICT_ALL,
        meta: bool = True,
        opt_mode: bool = False,
        structured: bool = True,
    ):
        self.h = nbd.NBD()
        self.h.set_request_structured_replies(structured)
        self.structured = structured
        self.messages: list[str] = []
        self.h.set_debug(True)
        self.h.set_debug_callback(self._debug)
        self.h.set_strict_mode(strict)
        assert self.h.get_strict_mode() == strict
        if meta:
            self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if opt_mode:
            self.h.set_opt_mode(True)

    def _debug(self, context: str, message: str) -> None:
        if message.startswith(SERVER_MESSAGE):
            self.messages.append(message[len(SERVER_MESSAGE) :])

    def connect(self, uri: str) -> Client:
        self.h.connect_uri(uri)
        if not self.h.aio_is_negotiating():
            assert self.h.get_structured_replies_negotiated() == self.structured
        return self

    def strict(self, without: int) -> None:
        """Turn off the given strict flags, keeping all others."""
        self.h.set_strict_mode(STRICT_ALL & ~without)

    def refused(self, call, expected_errno: int) -> str:
        """Run ``call``; it must fail with ``expected_errno`` as answered by the server.

        Returns the server's error message (proof that the server saw the request).
        """
        before = len(self.messages)
        with pytest.raises(nbd.Error) as info:
            call()
        got = info.value.errnum
        assert got == expected_errno, (
            f"expected {errno.errorcode[expected_errno]}, got {info.value}"
        )
        assert "command failed" in info.value.string, f"refused client-side: {info.value}"
        assert not self.h.aio_is_dead()
        new = self.messages[before:]
        if not self.structured:
            assert new == []
            return ""
        assert len(new) == 1, f"no error message from the server for {info.value}"
        return new[0]

    def refused_locally(self, call) -> None:
        """``call`` must fail inside libnbd, without any reply from the server."""
        before = len(self.messages)
        with pytest.raises(nbd.Error) as info:
            call()
        assert "command failed" not in info.value.string
        assert self.messages[before:] == []

    def extents(self, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
        seen: list[tuple[str, int, list[int]]] = []

        def callback(metacontext, off, entries, err):
            seen.append((metacontext, off, list(entries)))
            return 0

        self.h.block_status(count, offset, callback, flags)
        assert len(seen) == 1, seen
        context, off, entries = seen[0]
        assert context == nbd.CONTEXT_BASE_ALLOCATION and off == offset
        return list(zip(entries[0::2], entries[1::2], strict=True))

    def close(self) -> None:
        if not self.h.aio_is_closed() and not self.h.aio_is_dead():
            self.h.shutdown()


@pytest.fixture
def client():
    """client(uri, ...) -> a connected strict-mode Client, shut down at teardown."""
    made: list[Client] = []

    def make(uri: str | None = None, **kwargs) -> Client:
        c = Client(**kwargs)
        made.append(c)
        return c.connect(uri) if uri is not None else c

    yield make
    for c in made:
        c.close()


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def is_data(path: Path, offset: int) -> bool:
    """True if ``offset`` lies in an allocated (non-hole) part of the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError:  # ENXIO: nothing but hole up to the end
        return False
    finally:
        os.close(fd)


# --- negotiation -------------------------------------------------------------------


def test_strict_mode_and_negotiated_features(server, client):
    assert nbd.STRICT_MASK == STRICT_ALL  # every strict flag of this libnbd is on
    c = client(server.uri())
    h = c.h
    assert h.get_strict_mode() == nbd.STRICT_MASK
    assert h.get_protocol() == "newstyle-fixed"
    assert h.get_structured_replies_negotiated()
    assert h.get_size() == SIZE
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED)) == (1, 4096)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    assert not h.is_read_only()
    for can in ("flush", "fua", "trim", "zero", "fast_zero", "cache", "df", "multi_conn"):
        assert getattr(h, f"can_{can}")() == 1, can


# --- data path ---------------------------------------------------------------------


def _wait_all(h: nbd.NBD, cookies: list[int]) -> int:
    """Poll until every cookie completed (each must succeed); return max in flight."""
    pending = set(cookies)
    peak = h.aio_in_flight()
    while pending:
        peak = max(peak, h.aio_in_flight())
        h.poll(-1)
        for cookie in list(pending):
            if h.aio_command_completed(cookie):
                pending.discard(cookie)
    assert h.aio_in_flight() == 0
    return peak


@pytest.mark.parametrize("replies", ["structured", "simple"])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_64_requests_in_flight(nbd_server, image, client, transport, replies):
    server = nbd_server(str(image), export="disk", unix=transport == "unix")
    assert server.uri().startswith("nbd+unix://" if transport == "unix" else "nbd://")
    c = client(server.uri(), structured=replies == "structured")
    h = c.h
    rng = random.Random(7)
    blocks = []
    for i in range(64):  # 64 KiB blocks, odd offsets and sizes, spread over the export
        length = 64 * 1024 - rng.randrange(0, 512)
        offset = i * MiB - (rng.randrange(1, 4096) if i else 0)
        blocks.append((offset, rng.randbytes(length)))

    bufs = [nbd.Buffer.from_bytearray(data) for _, data in blocks]
    cookies = [h.aio_pwrite(buf, off) for buf, (off, _) in zip(bufs, blocks, strict=True)]
    assert h.aio_in_flight() == 64
    assert _wait_all(h, cookies) == 64
    h.flush()
    for offset, data in blocks:  # landed in the image file, byte for byte
        assert file_bytes(image, offset, len(data)) == data

    reads = [nbd.Buffer(len(data)) for _, data in blocks]
    cookies = [h.aio_pread(buf, off) for buf, (off, _) in zip(reads, blocks, strict=True)]
    assert h.aio_in_flight() == 64
    assert _wait_all(h, cookies) == 64
    for buf, (_, data) in zip(reads, blocks, strict=True):
        assert bytes(buf.to_bytearray()) == data

    # The gaps between the blocks were never written and still read as zeros.
    gap_start = blocks[0][0] + len(blocks[0][1])
    assert h.pread(blocks[1][0] - gap_start, gap_start) == bytes(blocks[1][0] - gap_start)


def test_zero_trim_flush_cache_fua(server, image, client):
    c = client(server.uri())
    h = c.h
    data = bytes(range(256)) * 1024  # 256 KiB
    base = 4 * MiB

    h.pwrite(data, base, nbd.CMD_FLAG_FUA)
    assert file_bytes(image, base, len(data)) == data
    h.flush()
    h.cache(len(data), base)

    # WRITE_ZEROES in the middle: only that range becomes zero.
    h.zero(64 * 1024, base + 64 * 1024)
    expected = data[: 64 * 1024] + bytes(64 * 1024) + data[128 * 1024 :]
    assert h.pread(len(data), base) == expected
    assert file_bytes(image, base, len(data)) == expected

    # FAST_ZERO (the server advertised it, and a raw file can zero fast) with FUA.
    h.zero(4096, base + 4096, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
    # NO_HOLE: zeros without deallocating.
    h.zero(512, base + 200 * 1024, nbd.CMD_FLAG_NO_HOLE)
    expected = (
        data[:4096]
        + bytes(4096)
        + expected[8192 : 200 * 1024]
        + bytes(512)
        + expected[200 * 1024 + 512 :]
    )
    assert h.pread(len(data), base) == expected
    assert file_bytes(image, base, len(data)) == expected

    # TRIM punches a hole: reads as zeros, and block status and the file agree.
    h.trim(128 * 1024, base + 128 * 1024, nbd.CMD_FLAG_FUA)
    expected = expected[: 128 * 1024] + bytes(128 * 1024)
    assert h.pread(len(data), base) == expected
    assert file_bytes(image, base, len(data)) == expected
    assert not is_data(image, base + 128 * 1024)
    assert c.extents(128 * 1024, base + 128 * 1024) == [(128 * 1024, HOLE_ZERO)]

    # Payload-less commands may be longer than the maximum payload (32 MiB).
    h.pwrite(b"\x33" * 4096, 60 * MiB)
    h.zero(40 * MiB, 20 * MiB + 4096)
    h.cache(40 * MiB, 20 * MiB)
    h.trim(40 * MiB, 20 * MiB)
    assert file_bytes(image, 60 * MiB, 8192) == bytes(8192)
    assert c.extents(40 * MiB, 20 * MiB) == [(40 * MiB, HOLE_ZERO)]

    # FUA is valid on every command once SEND_FUA is advertised; libnbd's
    # STRICT_FLAGS would refuse it on READ and FLUSH, the server must accept it.
    c.strict(without=nbd.STRICT_FLAGS)
    assert h.pread(len(data), base, nbd.CMD_FLAG_FUA) == expected
    h.flush(nbd.CMD_FLAG_FUA)
    h.cache(4096, base, nbd.CMD_FLAG_FUA)
    assert c.messages == []  # no command above failed on the server


def test_block_status_sparse(server, image, client):
    c = client(server.uri())
    h = c.h
    assert c.extents(SIZE, 0) == [(SIZE, HOLE_ZERO)]

    h.pwrite(b"\xa5" * 65536, MiB)
    assert c.extents(SIZE, 0) == [
        (MiB, HOLE_ZERO),
        (65536, 0),
        (SIZE - MiB - 65536, HOLE_ZERO),
    ]
    # REQ_ONE: exactly one extent, never longer than asked.
    assert c.extents(SIZE, 0, nbd.CMD_FLAG_REQ_ONE) == [(MiB, HOLE_ZERO)]
    assert c.extents(SIZE - MiB, MiB, nbd.CMD_FLAG_REQ_ONE) == [(65536, 0)]
    assert c.extents(4096, MiB + 8192, nbd.CMD_FLAG_REQ_ONE) == [(4096, 0)]
    # An unaligned window in the middle of the data, and one straddling its end.
    assert c.extents(1000, MiB + 12345) == [(1000, 0)]
    assert c.extents(8192, MiB + 61440) == [(4096, 0), (4096, HOLE_ZERO)]
    # The last byte of the export.
    assert c.extents(1, SIZE - 1) == [(1, HOLE_ZERO)]


def test_block_status_needs_a_context(server, client):
    c = client(server.uri(), meta=False)
    assert not c.h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    c.refused_locally(lambda: c.h.block_status(4096, 0, lambda *a: 0))
    c.strict(without=nbd.STRICT_COMMANDS)
    message = c.refused(lambda: c.h.block_status(4096, 0, lambda *a: 0), errno.EINVAL)
    assert "context" in message
    assert c.h.pread(4, 0) == bytes(4)


def test_structured_read_of_sparse_image(server, image, client):
    with open(image, "r+b") as f:  # data written behind the server's back
        f.seek(2 * MiB + 4096)
        f.write(b"\x5a" * 8192)
    c = client(server.uri())
    h = c.h
    chunks = []

    def chunk(subbuf, offset, status, error):
        assert error.value == 0
        chunks.append((offset, len(subbuf), status, bytes(subbuf)))
        return 0

    buf = h.pread_structured(4 * MiB, MiB, chunk)
    expected = bytes(MiB + 4096) + b"\x5a" * 8192 + bytes(3 * MiB - 4096 - 8192)
    assert bytes(buf) == expected
    chunks.sort()
    assert [(off, n, st) for off, n, st, _ in chunks] == [
        (MiB, MiB + 4096, nbd.READ_HOLE),
        (2 * MiB + 4096, 8192, nbd.READ_DATA),
        (2 * MiB + 12288, 3 * MiB - 12288, nbd.READ_HOLE),
    ]
    assert chunks[1][3] == b"\x5a" * 8192

    # DF: the whole read in one data chunk, holes included as zeros.
    chunks.clear()
    buf = h.pread_structured(4 * MiB, MiB, chunk, nbd.CMD_FLAG_DF)
    assert bytes(buf) == expected
    assert [(off, n, st) for off, n, st, _ in chunks] == [(MiB, 4 * MiB, nbd.READ_DATA)]
    assert chunks[0][3] == expected


# --- handshake options -------------------------------------------------------------


def _two_export_server(nbd_server, tmp_path: Path, make_image, **kw):
    other = make_image(3 * MiB, "other.img")
    config = tmp_path / "exports.toml"
    config.write_text(
        f'[[export]]\nname = "other"\npath = "{other}"\n'
        'description = "the other one"\nread-only = true\n'
    )
    image = make_image(SIZE, "disk.img")
    server = nbd_server(
        str(image), "--description", "main disk", "--config", str(config), export="disk", **kw
    )
    return server, image, other


def test_opt_mode_info_list_meta_and_go(nbd_server, tmp_path, make_image, client):
    server, _, _ = _two_export_server(nbd_server, tmp_path, make_image)
    c = client(server.uri(), opt_mode=True)
    h = c.h
    h.set_full_info(True)
    assert h.aio_is_negotiating()

    listed = []
    assert h.opt_list(lambda name, desc: listed.append((name, desc))) == 2
    assert listed == [("disk", "main disk"), ("other", "the other one")]

    h.opt_info()
    assert h.get_size() == SIZE
    assert h.get_canonical_export_name() == "disk"
    assert h.get_export_description() == "main disk"
    assert not h.is_read_only() and h.can_trim()
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB

    contexts = []
    h.clear_meta_contexts()  # no query: everything the export offers
    assert h.opt_list_meta_context(lambda name: contexts.append(name)) == 1
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    contexts.clear()
    h.add_meta_context("base:")  # a namespace wildcard
    assert h.opt_list_meta_context(lambda name: contexts.append(name)) == 1
    assert contexts == [nbd.CONTEXT_BASE_ALLOCATION]
    contexts.clear()
    h.clear_meta_contexts()
    h.add_meta_context("qemu:dirty-bitmap:nonexistent")
    assert h.opt_list_meta_context(lambda name: contexts.append(name)) == 0
    assert contexts == []

    h.set_export_name("other")  # INFO about another export on the same connection
    h.opt_info()
    assert h.get_size() == 3 * MiB
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    assert h.get_export_description() == "the other one"

    h.set_export_name("missing")
    with pytest.raises(nbd.Error) as info:
        h.opt_info()
    assert info.value.errnum == errno.ENOENT  # NBD_REP_ERR_UNKNOWN
    assert h.aio_is_negotiating()  # an INFO failure keeps the handshake going

    h.set_export_name("disk")
    h.clear_meta_contexts()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    assert h.aio_is_ready()
    assert h.get_size() == SIZE
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert c.extents(SIZE, 0) == [(SIZE, HOLE_ZERO)]


def test_opt_abort(server, client):
    c = client(server.uri(), opt_mode=True)
    assert c.h.aio_is_negotiating()
    c.h.opt_abort()
    assert c.h.aio_is_closed()
    # The server is fine afterwards.
    assert client(server.uri()).h.get_size() == SIZE


def test_empty_name_is_the_default_export(nbd_server, tmp_path, make_image, client):
    server, image, _ = _two_export_server(nbd_server, tmp_path, make_image)
    c = client(server.uri(""), opt_mode=True)
    h = c.h
    h.set_full_info(True)
    assert h.get_export_name() == ""
    h.opt_go()
    assert h.get_canonical_export_name() == "disk"
    assert h.get_size() == SIZE
    h.pwrite(b"via the default export", 12345)
    assert file_bytes(image, 12345, 22) == b"via the default export"
    other = client(server.uri("disk"))
    assert other.h.pread(22, 12345) == b"via the default export"


def test_unix_socket_default_export(nbd_server, image, client):
    server = nbd_server(str(image), unix=True)
    assert server.uri() == f"nbd+unix:///?socket={server.unix}"
    c = client(server.uri())
    c.h.pwrite(b"unix", 7)
    assert file_bytes(image, 7, 4) == b"unix"


def test_unknown_export_and_tls_refused(server, client):
    c = client()
    with pytest.raises(nbd.Error) as info:
        c.h.connect_uri(server.uri("missing"))
    assert info.value.errnum == errno.ENOENT  # NBD_REP_ERR_UNKNOWN on GO
    assert "missing" in info.value.string

    if not nbd.NBD().supports_tls():
        pytest.skip("libnbd without TLS support")
    c = client()
    c.h.set_tls(nbd.TLS_REQUIRE)
    with pytest.raises(nbd.Error) as info:
        c.h.connect_uri(server.uri())
    assert info.value.errnum == errno.ENOTSUP and "refused TLS" in info.value.string
    c = client()  # TLS_ALLOW: STARTTLS refused, the session goes on in plaintext
    c.h.set_tls(nbd.TLS_ALLOW)
    c.connect(server.uri())
    assert not c.h.get_tls_negotiated()
    c.h.pwrite(b"plain", 0)
    assert c.h.pread(5, 0) == b"plain"


# --- refusals ----------------------------------------------------------------------


def test_read_only_export_refuses_writes(nbd_server, image, client):
    with open(image, "r+b") as f:
        f.write(b"original")
    server = nbd_server(str(image), "--read-only", export="disk")
    c = client(server.uri())
    h = c.h
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero()
    assert h.pread(8, 0) == b"original"

    c.refused_locally(lambda: h.pwrite(b"x" * 8, 0))  # libnbd's STRICT_COMMANDS at work
    c.strict(without=nbd.STRICT_COMMANDS)
    assert "read-only" in c.refused(lambda: h.pwrite(b"x" * 8, 0), errno.EPERM)
    assert "read-only" in c.refused(lambda: h.pwrite(b"x" * 8, 0, nbd.CMD_FLAG_FUA), errno.EPERM)
    c.refused(lambda: h.trim(4096, 0), errno.EPERM)
    c.refused(lambda: h.zero(4096, 0), errno.EPERM)
    h.flush()  # allowed on a read-only export
    assert h.pread(8, 0) == b"original"
    assert file_bytes(image, 0, 8) == b"original"


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_oversized_write_is_refused_and_survived(server, image, client, structured):
    c = client(server.uri(), structured=structured)
    h = c.h
    h.pwrite(b"before", 0)
    big = b"\xee" * (33 * MiB)  # above the advertised 32 MiB maximum payload
    # libnbd 1.14 checks payloads only against its own 64 MiB cap, so this is sent.
    message = c.refused(lambda: h.pwrite(big, 16 * MiB), errno.EINVAL)
    assert "large" in message or not structured
    # The same connection is still in sync: the 33 MiB were drained, not executed.
    assert h.pread(6, 0) == b"before"
    assert h.pread(4096, 16 * MiB) == bytes(4096)
    assert file_bytes(image, 16 * MiB, 33 * MiB) == bytes(33 * MiB)
    # A READ above the maximum is refused as well (libnbd 1.14 would let it through).
    assert "large" in c.refused(lambda: h.pread(33 * MiB, 0), errno.EINVAL) or not structured
    # Exactly the maximum works.
    top = random.Random(1).randbytes(32 * MiB)
    h.pwrite(top, 16 * MiB)
    assert h.pread(32 * MiB, 16 * MiB) == top
    # A new connection works too.
    assert client(server.uri()).h.pread(6, 0) == b"before"


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_requests_past_the_end(server, image, client, structured):
    c = client(server.uri(), structured=structured)
    h = c.h
    c.refused_locally(lambda: h.pread(512, SIZE))  # STRICT_BOUNDS
    c.strict(without=nbd.STRICT_BOUNDS)
    for offset in (SIZE - 511, SIZE, SIZE + MiB):
        c.refused(lambda o=offset: h.pread(512, o), errno.EINVAL)
        c.refused(lambda o=offset: h.pwrite(b"z" * 512, o), errno.ENOSPC)
        c.refused(lambda o=offset: h.zero(512, o), errno.ENOSPC)
        c.refused(lambda o=offset: h.trim(512, o), errno.EINVAL)
        c.refused(lambda o=offset: h.cache(512, o), errno.EINVAL)
        if structured:
            c.refused(lambda o=offset: h.block_status(512, o, lambda *a: 0), errno.EINVAL)
    if structured:
        assert all("past the end" in m for m in c.messages), c.messages
    assert image.stat().st_size == SIZE  # nothing was written past the end
    assert file_bytes(image, SIZE - 511, 511) == bytes(511)
    h.pwrite(b"end", SIZE - 3)  # right up to the end is fine
    assert h.pread(3, SIZE - 3) == b"end"


def test_unknown_and_misplaced_flags(server, image, client):
    c = client(server.uri())
    h = c.h
    c.refused_locally(lambda: h.pread(512, 0, 0x100))  # STRICT_FLAGS
    c.strict(without=nbd.STRICT_FLAGS)
    assert "flags" in c.refused(lambda: h.pread(512, 0, 0x100), errno.EINVAL)
    assert "flags" in c.refused(lambda: h.pwrite(b"w" * 512, 0, 0x8000), errno.EINVAL)
    # Known flags on the wrong command.
    c.refused(lambda: h.pwrite(b"w" * 512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
    c.refused(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
    c.refused(lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL)
    c.refused(lambda: h.flush(nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
    c.refused(lambda: h.cache(512, 0, 0x40), errno.EINVAL)
    c.refused(lambda: h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_DF), errno.EINVAL)
    # None of the refused writes touched the image; the connection goes on.
    assert file_bytes(image, 0, 512) == bytes(512)
    assert not is_data(image, 0)
    h.pwrite(b"w" * 512, 0)
    assert file_bytes(image, 0, 512) == b"w" * 512


def test_zero_length_requests(server, image, client):
    c = client(server.uri())
    h = c.h
    c.refused_locally(lambda: h.pread(0, 0))  # STRICT_ZERO_SIZE
    c.strict(without=nbd.STRICT_ZERO_SIZE)
    assert h.pread(0, 4096) == b""
    h.pwrite(b"", 4096)
    h.pwrite(b"", 4096, nbd.CMD_FLAG_FUA)
    h.zero(0, 4096)
    h.trim(0, 4096)
    h.cache(0, 4096)
    c.refused(lambda: h.block_status(0, 4096, lambda *a: 0), errno.EINVAL)
    assert c.messages == ["block status of length 0"]
    assert not is_data(image, 0)
    h.pwrite(b"after", 4096)
    assert h.pread(5, 4096) == b"after"


# --- handshake variants and disconnect -----------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        0,
        nbd.HANDSHAKE_FLAG_NO_ZEROES,
        nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE,
        nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE | nbd.HANDSHAKE_FLAG_NO_ZEROES,
    ],
    ids=["plain", "plain-no-zeroes", "fixed", "fixed-no-zeroes"],
)
def test_handshake_variants(server, image, client, flags):
    """Plain newstyle clients can only use EXPORT_NAME (with or without the 124 zero
    bytes): libnbd must land in transmission in sync either way."""
    fixed = bool(flags & nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    c = client(structured=fixed)  # no options besides EXPORT_NAME: simple replies only
    c.h.set_handshake_flags(flags)
    c.connect(server.uri())
    h = c.h
    assert h.get_handshake_flags() == flags
    assert h.get_protocol() == ("newstyle-fixed" if fixed else "newstyle")
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == fixed
    assert h.get_size() == SIZE
    h.pwrite(b"handshake %d" % flags, SIZE - 4096)
    assert h.pread(11, SIZE - 4096) == b"handshake %d" % flags
    assert file_bytes(image, SIZE - 4096, 11) == b"handshake %d" % flags


def test_shutdown_with_requests_in_flight(server, image, client):
    """NBD_CMD_DISC right behind 64 unanswered writes: all of them are answered and
    applied before the server closes the connection."""
    c = client(server.uri())
    h = c.h
    blocks = [bytes([i + 1]) * 65536 for i in range(64)]
    bufs = [nbd.Buffer.from_bytearray(data) for data in blocks]
    cookies = [h.aio_pwrite(buf, i * MiB) for i, buf in enumerate(bufs)]
    assert h.aio_in_flight() == 64
    h.shutdown()
    assert h.aio_is_closed()
    assert all(h.aio_command_completed(cookie) for cookie in cookies)
    for i, data in enumerate(blocks):
        assert file_bytes(image, i * MiB, 65536) == data
