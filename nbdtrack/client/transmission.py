"""The client side of the transmission phase, sans-IO: requests out, replies in.

``encode_request`` builds a request header in the negotiated style. ``ReplyParser``
is told about every request sent (``expect``), is fed the server's bytes, and hands
out one ``Reply`` per finished request, in whatever order the server finishes them:
simple replies, structured chunks and extended chunks are assembled per cookie (READ
data and holes into one buffer, BLOCK_STATUS extents per context id).

Bytes come in through ``get_buffer``/``buffer_updated`` (what ``asyncio.BufferedProtocol``
calls; ``receive_data`` feeds bytes the same way): headers are parsed where the socket put
them, and when much of a READ's data is still to come the parser hands out its
destination instead, so that the rest goes from the socket straight to where it belongs —
the caller's buffer for ``expect(..., into=)``, else the buffer the reply's data is made
of. A large READ into the caller's buffer is then copied once, by the kernel.

It is strict on purpose, because it is also the tool that tests the server: anything
the spec forbids the server to send (a chunk outside the request, a READ that does not
cover its range, an unknown cookie, a missing DONE, a context id that was never
negotiated, extents past the end of the export ...) raises ``NBDProtocolError``, after
which the stream cannot be trusted and the connection must be dropped.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from nbdtrack.client.errors import NBDProtocolError
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.buffers import make_room
from nbdtrack.protocol.events import Mode

# A non-data chunk never needs more: 2^20 extended extents plus their header.
MAX_CHUNK_PAYLOAD = c.BLOCK_STATUS_EXT_HEADER.size + c.EXTENT_EXT.size * (1 << 20)
_MAX_U32 = 0xFFFFFFFF
_MAX_U64 = 0xFFFFFFFFFFFFFFFF
_ERROR_TYPE_BIT = 1 << 15
RECV_BUFFER = 256 * 1024  # the receive buffer's usual size: what one read may bring
MIN_FREE = RECV_BUFFER // 4  # less room than this at its end: make room first
SINK_MIN = 64 * 1024  # READ data still to come from here is received into its destination


class Extent(NamedTuple):
    """One BLOCK_STATUS descriptor: ``length`` bytes with context-specific ``flags``."""

    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The whole answer to one request.

    ``error`` is 0 on success; otherwise the NBD errno, the server's ``message`` and,
    for NBD_REPLY_TYPE_ERROR_OFFSET, ``error_offset``. A successful READ has ``data``
    (unless it was read into the caller's buffer: ``expect(..., into=)``); a successful
    BLOCK_STATUS has ``extents`` by context id.
    """

    cookie: int
    command: int
    offset: int
    length: int
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    data: bytes | None = None
    extents: dict[int, list[Extent]] | None = None
    chunks: int = 0  # structured/extended chunks that made up the reply (0: simple)


def encode_request(
    mode: Mode, command: int, flags: int, cookie: int, offset: int, length: int
) -> bytes:
    """A request header: 28 bytes compact, 32 bytes extended (64-bit length)."""
    limit = _MAX_U64 if mode is Mode.EXTENDED else _MAX_U32
    if not 0 <= length <= limit:
        raise ValueError(f"length {length} does not fit a {mode.name.lower()} request")
    if not 0 <= offset <= _MAX_U64:
        raise ValueError(f"offset {offset} does not fit 64 bits")
    if not 0 <= flags <= 0xFFFF or not 0 <= command <= 0xFFFF:
        raise ValueError(f"command {command} / flags {flags:#x} do not fit 16 bits")
    if mode is Mode.EXTENDED:
        return c.EXTENDED_REQUEST.pack(
            c.NBD_EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
        )
    return c.REQUEST.pack(c.NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)


@dataclass(slots=True)
class _Pending:
    """What the parser knows of a request in flight, and its reply so far."""

    command: int
    flags: int
    offset: int
    length: int
    chunks: int = 0  # structured chunks so far (any: no simple reply any more)
    into: memoryview | None = None  # READ: the caller's buffer for the data
    data: bytes | bytearray | None = None  # READ without ``into``: the result
    pieces: list[tuple[int, int]] = field(default_factory=list)  # READ: (start, end)
    extents: dict[int, list[Extent]] = field(default_factory=dict)
    error: tuple[int, str, int | None] | None = None


@dataclass(slots=True)
class _Header:
    """The header being processed, waiting for its payload."""

    cookie: int
    simple: bool
    error: int = 0  # simple replies
    flags: int = 0  # chunks
    type: int = 0
    length: int = 0  # payload bytes that follow
    data: bool = False  # the payload is READ data (after the offset, for a chunk)


class ReplyParser:
    """Turns the server's transmission bytes into ``Reply`` objects."""

    def __init__(self, mode: Mode, export_size: int, context_ids: Collection[int] = ()) -> None:
        self.mode = mode
        self.export_size = export_size
        self.context_ids = frozenset(context_ids)
        self._pending: dict[int, _Pending] = {}
        self._buf = bytearray(RECV_BUFFER)
        self._pos = 0  # the next byte to parse
        self._end = 0  # the end of what was received
        self._header: _Header | None = None
        # READ data received straight into its destination: what is left of it, and the
        # header it belongs to.
        self._sink: memoryview | None = None
        self._sink_header: _Header | None = None

    # --- public surface --------------------------------------------------------------

    def expect(
        self,
        cookie: int,
        command: int,
        flags: int,
        offset: int,
        length: int,
        into: memoryview | None = None,
    ) -> None:
        """Register a request about to be sent, so its reply can be recognised. A READ
        given ``into`` (``length`` bytes, writable) has its data put there, holes as
        zeros, and its reply carries no ``data``."""
        if cookie in self._pending:
            raise ValueError(f"cookie {cookie} is already in flight")
        if into is not None and (command != c.NBD_CMD_READ or into.nbytes != length):
            raise ValueError(f"into: a buffer of {length} bytes for a READ")
        self._pending[cookie] = _Pending(command, flags, offset, length, into=into)

    def forget(self, cookie: int) -> None:
        """Drop a request that was registered but never sent."""
        self._pending.pop(cookie, None)

    def drop_into(self, cookie: int) -> None:
        """The caller of a READ with ``into`` stopped waiting for it: the rest of its data
        goes to a scratch buffer, never again into the caller's."""
        request = self._pending.get(cookie)
        if request is None or request.into is None:
            return
        request.into = memoryview(bytearray(request.length))
        header = self._sink_header
        if self._sink is not None and header is not None and header.cookie == cookie:
            self._sink = memoryview(bytearray(self._sink.nbytes))

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the server go (all of them, or a first part): the
        rest of a READ's data in its destination, else the free end of the receive
        buffer. Call ``buffer_updated`` with how many were put there."""
        if self._sink is not None and self._sink.nbytes:
            return self._sink[:]  # a view of its own: the caller may release it
        self._make_room()
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were put at the start of the last ``get_buffer``."""
        if self._sink is not None and self._sink.nbytes:
            self._sink = self._sink[nbytes:]
        else:
            self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server (through the same buffers)."""
        with memoryview(data) as view, view.cast("B") as rest:
            while rest.nbytes:
                with self.get_buffer() as buf:
                    n = min(buf.nbytes, rest.nbytes)
                    buf[:n] = rest[:n]
                self.buffer_updated(n)
                rest = rest[n:]

    def next_reply(self) -> Reply | None:
        """The next finished reply, or None when more bytes are needed."""
        while True:
            if self._sink is not None:
                if self._sink.nbytes:
                    return None
                header = self._sink_header
                assert header is not None
                self._sink = self._sink_header = None
                reply = self._data_done(header)
                if reply is not None:
                    return reply
                continue
            if self._header is None and not self._read_header():
                return None
            header = self._header
            assert header is not None
            available = self._end - self._pos
            if header.data:
                if not self._take_data(header, available):
                    return None
                if self._sink is None:
                    reply = self._data_done(header)
                    if reply is not None:
                        return reply
                continue
            if available < header.length:
                return None
            start = self._pos
            self._pos += header.length
            self._header = None
            reply = self._process(header, start)
            if reply is not None:
                return reply

    # --- headers ---------------------------------------------------------------------

    def _read_header(self) -> bool:
        available = self._end - self._pos
        if available < 4:
            return False
        (magic,) = c.U32.unpack_from(self._buf, self._pos)
        if magic == c.NBD_SIMPLE_REPLY_MAGIC:
            if self.mode is Mode.EXTENDED:
                raise NBDProtocolError("simple reply after extended headers were negotiated")
            if available < c.SIMPLE_REPLY.size:
                return False
            _, error, cookie = c.SIMPLE_REPLY.unpack_from(self._buf, self._pos)
            self._pos += c.SIMPLE_REPLY.size
            self._header = self._simple_header(cookie, error)
            return True
        if magic == c.NBD_STRUCTURED_REPLY_MAGIC:
            if self.mode is not Mode.STRUCTURED:
                raise NBDProtocolError(f"structured reply chunk in {self.mode.name} mode")
            if available < c.STRUCTURED_CHUNK.size:
                return False
            _, flags, ctype, cookie, length = c.STRUCTURED_CHUNK.unpack_from(self._buf, self._pos)
            self._pos += c.STRUCTURED_CHUNK.size
            self._header = self._chunk_header(cookie, flags, ctype, length, None)
            return True
        if magic == c.NBD_EXTENDED_REPLY_MAGIC:
            if self.mode is not Mode.EXTENDED:
                raise NBDProtocolError(f"extended reply chunk in {self.mode.name} mode")
            if available < c.EXTENDED_CHUNK.size:
                return False
            _, flags, ctype, cookie, offset, length = c.EXTENDED_CHUNK.unpack_from(
                self._buf, self._pos
            )
            self._pos += c.EXTENDED_CHUNK.size
            self._header = self._chunk_header(cookie, flags, ctype, length, offset)
            return True
        raise NBDProtocolError(f"bad reply magic 0x{magic:08x}")

    def _request(self, cookie: int) -> _Pending:
        request = self._pending.get(cookie)
        if request is None:
            raise NBDProtocolError(f"reply for cookie {cookie:#x}, which is not in flight")
        return request

    def _simple_header(self, cookie: int, error: int) -> _Header:
        request = self._request(cookie)
        if request.chunks:
            raise NBDProtocolError(f"simple reply for cookie {cookie:#x} after its chunks")
        length = 0
        if request.command == c.NBD_CMD_BLOCK_STATUS and error == 0:
            raise NBDProtocolError("simple success reply to BLOCK_STATUS: where are the extents?")
        if request.command == c.NBD_CMD_READ:
            if self.mode is not Mode.SIMPLE:
                raise NBDProtocolError("simple reply to a READ with structured replies on")
            if error == 0:
                length = request.length  # the data follows with no framing
        return _Header(cookie, simple=True, error=error, length=length, data=length > 0)

    def _chunk_header(
        self, cookie: int, flags: int, ctype: int, length: int, offset: int | None
    ) -> _Header:
        request = self._request(cookie)
        request.chunks += 1
        where = f"chunk type {ctype} for cookie {cookie:#x}"
        if flags & ~c.NBD_REPLY_FLAG_DONE:
            raise NBDProtocolError(f"{where} has unknown flags {flags:#x}")
        if offset is not None and offset != request.offset:
            raise NBDProtocolError(
                f"{where} echoes offset {offset}, the request was at {request.offset}"
            )
        is_read = request.command == c.NBD_CMD_READ
        if ctype == c.NBD_REPLY_TYPE_NONE:
            if length or not flags & c.NBD_REPLY_FLAG_DONE:
                raise NBDProtocolError(f"{where}: NONE needs length 0 and DONE")
        elif ctype == c.NBD_REPLY_TYPE_OFFSET_DATA:
            if not is_read:
                raise NBDProtocolError(f"{where}: OFFSET_DATA to a non-READ")
            if not c.U64.size < length <= c.U64.size + request.length:
                raise NBDProtocolError(f"{where}: OFFSET_DATA of {length} bytes")
        elif ctype == c.NBD_REPLY_TYPE_OFFSET_HOLE:
            if not is_read:
                raise NBDProtocolError(f"{where}: OFFSET_HOLE to a non-READ")
            if length != c.OFFSET_HOLE.size:
                raise NBDProtocolError(f"{where}: OFFSET_HOLE of {length} bytes")
        elif ctype in (c.NBD_REPLY_TYPE_BLOCK_STATUS, c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT):
            extended = ctype == c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT
            if request.command != c.NBD_CMD_BLOCK_STATUS:
                raise NBDProtocolError(f"{where}: block status to a non-BLOCK_STATUS")
            if extended != (self.mode is Mode.EXTENDED):
                raise NBDProtocolError(f"{where}: wrong block status type for the mode")
            head = c.BLOCK_STATUS_EXT_HEADER.size if extended else c.U32.size
            size = c.EXTENT_EXT.size if extended else c.EXTENT.size
            if length < head + size or (length - head) % size or length > MAX_CHUNK_PAYLOAD:
                raise NBDProtocolError(f"{where}: block status payload of {length} bytes")
        elif ctype & _ERROR_TYPE_BIT:
            if not c.ERROR_HEADER.size <= length <= MAX_CHUNK_PAYLOAD:
                raise NBDProtocolError(f"{where}: error payload of {length} bytes")
        else:
            raise NBDProtocolError(f"unknown non-error {where}")
        return _Header(
            cookie,
            simple=False,
            flags=flags,
            type=ctype,
            length=length,
            data=ctype == c.NBD_REPLY_TYPE_OFFSET_DATA,
        )

    # --- payloads ----------------------------------------------------------------------

    def _process(self, header: _Header, start: int) -> Reply | None:
        """A reply or chunk whose payload is not READ data (``_take_data`` has those)."""
        request = self._pending[header.cookie]
        if header.simple:
            del self._pending[header.cookie]
            return Reply(
                header.cookie,
                request.command,
                request.offset,
                request.length,
                error=header.error,
                data=b"" if request.command == c.NBD_CMD_READ and not header.error else None,
            )
        ctype = header.type
        if ctype == c.NBD_REPLY_TYPE_OFFSET_HOLE:
            hole_offset, hole_length = c.OFFSET_HOLE.unpack_from(self._buf, start)
            if hole_length == 0:
                raise NBDProtocolError("OFFSET_HOLE of length 0")
            self._piece(request, hole_offset, hole_length)
            if request.into is not None:  # the caller's buffer holds anything: zero it
                at = hole_offset - request.offset
                request.into[at : at + hole_length] = bytes(hole_length)
        elif ctype in (c.NBD_REPLY_TYPE_BLOCK_STATUS, c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT):
            self._block_status(request, start, header.length, ctype)
        elif ctype & _ERROR_TYPE_BIT:
            self._error_chunk(request, start, header.length, ctype)
        if header.flags & c.NBD_REPLY_FLAG_DONE:
            return self._finish(header.cookie)
        return None

    def _piece(self, request: _Pending, offset: int, length: int) -> None:
        """Record a READ data or hole chunk; it must lie inside the request."""
        if offset < request.offset or offset + length > request.offset + request.length:
            raise NBDProtocolError(
                f"READ chunk {offset}+{length} outside the request "
                f"{request.offset}+{request.length}"
            )
        if request.flags & c.NBD_CMD_FLAG_DF and request.pieces:
            raise NBDProtocolError("READ with DF answered in more than one chunk")
        request.pieces.append((offset, offset + length))

    def _take_data(self, header: _Header, available: int) -> bool:
        """READ data (a simple reply's, or an OFFSET_DATA chunk's after its offset): what
        is here is copied to its destination, and when at least ``SINK_MIN`` bytes of it
        are still to come, the rest is received there (``self._sink``). False: wait for
        more bytes in the buffer."""
        request = self._pending[header.cookie]
        head = 0 if header.simple else c.U64.size
        size = header.length - head
        here = min(size, available - head)
        if here < 0 or (here < size and size - here < SINK_MIN):
            return False
        if header.simple:
            at = 0
        else:
            (offset,) = c.U64.unpack_from(self._buf, self._pos)
            self._piece(request, offset, size)
            at = offset - request.offset
        start = self._pos + head
        self._pos = start + here
        self._header = None
        with memoryview(self._buf) as view, view[start : start + here] as piece:
            whole = here == size == request.length and request.data is None
            if whole and request.into is None:
                request.data = bytes(piece)  # the whole reply in one chunk: one copy
                return True
            dest = self._destination(request)
            dest[at : at + here] = piece
        if here < size:
            self._sink = dest[at + here : at + size]
            self._sink_header = header
        return True

    def _destination(self, request: _Pending) -> memoryview:
        """Where a READ's data goes: the caller's buffer, else one for the reply."""
        if request.into is not None:
            return request.into
        if not isinstance(request.data, bytearray):
            # Holes stay zero; a second chunk over a whole one fails the coverage check.
            request.data = bytearray(request.data or request.length)
        return memoryview(request.data)

    def _data_done(self, header: _Header) -> Reply | None:
        """A READ's data arrived in full: a simple reply is finished, a chunk may be."""
        if header.simple:
            request = self._pending.pop(header.cookie)
            return Reply(
                header.cookie,
                request.command,
                request.offset,
                request.length,
                data=self._result(request),
            )
        if header.flags & c.NBD_REPLY_FLAG_DONE:
            return self._finish(header.cookie)
        return None

    @staticmethod
    def _result(request: _Pending) -> bytes | None:
        """A READ reply's ``data``: none when it went into the caller's buffer."""
        if request.into is not None:
            return None
        if request.data is None:
            return bytes(request.length)
        return bytes(request.data) if isinstance(request.data, bytearray) else request.data

    def _block_status(self, request: _Pending, start: int, length: int, ctype: int) -> None:
        if ctype == c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT:
            context_id, count = c.BLOCK_STATUS_EXT_HEADER.unpack_from(self._buf, start)
            pos = start + c.BLOCK_STATUS_EXT_HEADER.size
            layout = c.EXTENT_EXT
            if count != (length - c.BLOCK_STATUS_EXT_HEADER.size) // layout.size:
                raise NBDProtocolError(f"BLOCK_STATUS_EXT says {count} extents, length differs")
        else:
            (context_id,) = c.U32.unpack_from(self._buf, start)
            pos = start + c.U32.size
            layout = c.EXTENT
            count = (length - c.U32.size) // layout.size
        if context_id not in self.context_ids:
            raise NBDProtocolError(f"block status for context id {context_id}, never negotiated")
        if context_id in request.extents:
            raise NBDProtocolError(f"two block status chunks for context id {context_id}")
        raw = self._buf[pos : pos + count * layout.size]
        extents = [Extent(*fields) for fields in layout.iter_unpack(raw)]
        if any(e.length == 0 for e in extents):
            raise NBDProtocolError(f"zero-length extent for context id {context_id}")
        if request.flags & c.NBD_CMD_FLAG_REQ_ONE:
            if count != 1 or extents[0].length > request.length:
                raise NBDProtocolError(f"REQ_ONE answered with {count} extents or too long")
        elif sum(e.length for e in extents[:-1]) >= request.length:
            raise NBDProtocolError("block status extents continue past the request")
        if request.offset + sum(e.length for e in extents) > self.export_size:
            raise NBDProtocolError("block status extents run past the end of the export")
        request.extents[context_id] = extents

    def _error_chunk(self, request: _Pending, start: int, length: int, ctype: int) -> None:
        error, size = c.ERROR_HEADER.unpack_from(self._buf, start)
        if error == 0:
            raise NBDProtocolError("error chunk with error 0")
        end = start + c.ERROR_HEADER.size + size
        expected = c.ERROR_HEADER.size + size
        if ctype == c.NBD_REPLY_TYPE_ERROR_OFFSET:
            expected += c.U64.size
        if length != expected and not (ctype not in _KNOWN_ERRORS and length > expected):
            raise NBDProtocolError(f"error chunk of {length} bytes, message of {size}")
        message = bytes(self._buf[start + c.ERROR_HEADER.size : end]).decode("utf-8", "replace")
        offset = None
        if ctype == c.NBD_REPLY_TYPE_ERROR_OFFSET:
            (offset,) = c.U64.unpack_from(self._buf, end)
            if not request.offset <= offset < request.offset + max(request.length, 1):
                raise NBDProtocolError(f"ERROR_OFFSET {offset} outside the request")
        if request.error is None:  # the first error is the one that counts
            request.error = (error, message, offset)

    def _finish(self, cookie: int) -> Reply:
        request = self._pending.pop(cookie)
        if request.error is not None:
            error, message, offset = request.error
            return Reply(
                cookie,
                request.command,
                request.offset,
                request.length,
                error=error,
                message=message,
                error_offset=offset,
                chunks=request.chunks,
            )
        data = None
        extents = None
        if request.command == c.NBD_CMD_READ:
            _check_coverage(request)
            data = self._result(request)
        elif request.command == c.NBD_CMD_BLOCK_STATUS:
            missing = self.context_ids - request.extents.keys()
            if missing:
                raise NBDProtocolError(f"block status reply lacks context ids {sorted(missing)}")
            extents = request.extents
        return Reply(
            cookie,
            request.command,
            request.offset,
            request.length,
            data=data,
            extents=extents,
            chunks=request.chunks,
        )

    def _make_room(self) -> None:
        """At least ``MIN_FREE`` bytes free at the end of the receive buffer."""
        self._buf, self._pos, self._end = make_room(
            self._buf, self._pos, self._end, MIN_FREE, RECV_BUFFER
        )


_KNOWN_ERRORS = (c.NBD_REPLY_TYPE_ERROR, c.NBD_REPLY_TYPE_ERROR_OFFSET)


def _check_coverage(request: _Pending) -> None:
    """A successful READ's chunks cover its range exactly once."""
    pos = request.offset
    for start, end in sorted(request.pieces):
        if start != pos:
            what = "overlap" if start < pos else "leave a gap"
            raise NBDProtocolError(f"READ chunks {what} at offset {min(start, pos)}")
        pos = end
    if pos != request.offset + request.length:
        raise NBDProtocolError(f"READ chunks stop at {pos}, the request ends further")
