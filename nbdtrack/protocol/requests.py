"""Transmission requests: bytes in, ``Request`` events out, and their validation.

``RequestParser`` turns the client's byte stream into complete requests (a request is
only emitted once its whole payload has arrived, so a client that vanishes mid-request
never has it applied). Oversized or unexpected payloads are drained without being
buffered and the request comes out carrying an error, so the stream stays in sync. It
comes out only once the last byte of its payload has been drained: a client is still
sending the request until then, and libnbd, for one, drops the connection ("no
matching cookie") when the reply to a WRITE arrives before the WRITE has been sent.
Large payloads are copied once, straight into a buffer of their final size, rather than
accumulated and then sliced out: a 32 MiB WRITE then costs 32 MiB, not two or three
times that. Fed through ``get_buffer``/``buffer_updated`` (an ``asyncio.BufferedProtocol``
reading with ``recv_into``) such a payload is not copied at all: the kernel writes it
into its final buffer, which the server hands back (``recycle``) once written, so that
the next payload of its size needs no new buffer; headers and small payloads are parsed
in the parser's own buffer, where ``recv_into`` put them. ``check_request`` applies the
spec's rules that depend on the export.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.buffers import make_room
from nbdtrack.protocol.errors import ProtocolError, RequestError, invalid
from nbdtrack.protocol.events import Mode, Request

# Flags each command accepts besides FUA (always accepted: SEND_FUA is advertised).
_COMMAND_FLAGS = {
    c.NBD_CMD_READ: c.NBD_CMD_FLAG_DF,
    c.NBD_CMD_WRITE: 0,
    c.NBD_CMD_DISC: 0,
    c.NBD_CMD_FLUSH: 0,
    c.NBD_CMD_TRIM: 0,
    c.NBD_CMD_CACHE: 0,
    c.NBD_CMD_WRITE_ZEROES: c.NBD_CMD_FLAG_NO_HOLE | c.NBD_CMD_FLAG_FAST_ZERO,
    c.NBD_CMD_BLOCK_STATUS: c.NBD_CMD_FLAG_REQ_ONE,
}
_WRITING = frozenset({c.NBD_CMD_WRITE, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES})
# Payloads at least this large are filled in place (see the module docstring).
DIRECT_PAYLOAD = 64 * 1024
SCRATCH_BYTES = 256 * 1024  # the parser's buffer for headers and small payloads
MIN_READ = 64 * 1024  # get_buffer makes at least this much room in it
POOL_BYTES = 4 * 1024 * 1024  # large payload buffers kept for reuse (see recycle)
# After a payload this large the next header is read alone (see get_buffer): below it,
# the extra read cost more than the copy it saves (64 KiB writes -8%, 128 KiB even,
# 256 KiB +80% in an A/B run; bench/README.md).
HEADER_ALONE_AFTER = 128 * 1024
_RANGED = frozenset(
    {
        c.NBD_CMD_READ,
        c.NBD_CMD_WRITE,
        c.NBD_CMD_TRIM,
        c.NBD_CMD_CACHE,
        c.NBD_CMD_WRITE_ZEROES,
        c.NBD_CMD_BLOCK_STATUS,
    }
)


class RequestParser:
    """Splits the transmission byte stream into requests."""

    def __init__(
        self, mode: Mode, max_payload: int = c.MAX_PAYLOAD, direct_payload: int = DIRECT_PAYLOAD
    ) -> None:
        self.extended = mode is Mode.EXTENDED
        self._header = c.EXTENDED_REQUEST if self.extended else c.REQUEST
        self._magic = c.NBD_EXTENDED_REQUEST_MAGIC if self.extended else c.NBD_REQUEST_MAGIC
        self._max_payload = max_payload
        self._buf = bytearray()  # received bytes not parsed yet: _buf[_pos:_end]
        self._pos = 0
        self._end = 0
        self._pending: Request | None = None  # header read, payload not complete yet
        self._payload_len = 0
        self._drain_left = 0
        self._drained: Request | None = None  # refused request whose payload is draining
        self._direct_payload = direct_payload
        self._direct: bytearray | None = None  # a large payload being filled in place
        self._filled = 0
        self._into_direct = False  # what the last get_buffer handed out
        self._after_large = False  # the last request's payload was HEADER_ALONE_AFTER or more
        self._pool: dict[int, list[bytearray]] = {}  # recycled payload buffers, by size
        self._pooled = 0

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes received should go; ``buffer_updated`` says how many came.

        While a large payload is being filled, the rest of its own buffer (never more:
        the next request's header must not land in it); otherwise the free end of the
        parser's own buffer, so that headers and small payloads are parsed where the
        kernel put them.
        """
        direct = self._direct
        if direct is not None and not self._drain_left and self._filled < len(direct):
            self._into_direct = True
            return memoryview(direct)[self._filled :]
        self._into_direct = False
        self._make_room(MIN_READ)
        view = memoryview(self._buf)[self._end :]
        if self._after_large and not self._drain_left:
            # Large payloads come in a row (a copy, sequential writes): read the next
            # header alone, so that its payload lands in its own buffer, not here to be
            # copied over (a quarter of a 1 MiB WRITE's payload, when it came in here).
            missing = self._header.size - (self._end - self._pos)
            if missing > 0:
                return view[:missing]
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer``'s buffer."""
        if self._into_direct:
            self._filled += nbytes
        else:
            self._received(nbytes)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._make_room(len(data))
        self._buf[self._end : self._end + len(data)] = data
        self._received(len(data))

    def recycle(self, data: bytes | bytearray | memoryview) -> None:
        """A WRITE's payload that nothing uses any more (the write is done): the next
        large payload of its size is received into it, not into a new zeroed buffer."""
        buf = data.obj if isinstance(data, memoryview) else None
        size = len(data)
        if (
            isinstance(buf, bytearray)
            and len(buf) == size >= self._direct_payload
            and self._pooled + size <= POOL_BYTES
        ):
            free = self._pool.setdefault(size, [])
            if all(kept is not buf for kept in free):
                free.append(buf)
                self._pooled += size

    def _received(self, count: int) -> None:
        """Take ``count`` new bytes at ``_buf[_end:]``: drained ones are dropped, those of
        a payload being filled go to its buffer, the rest wait to be parsed."""
        buf, start = self._buf, self._end
        skip = 0
        if self._drain_left:
            skip = min(self._drain_left, count)
            self._drain_left -= skip
        direct = self._direct
        if direct is not None and count > skip:
            take = min(len(direct) - self._filled, count - skip)
            first = start + skip
            with memoryview(buf) as view:
                direct[self._filled : self._filled + take] = view[first : first + take]
            self._filled += take
            skip += take
        if skip and count > skip:  # close the gap: rare (after a drain or a payload's end)
            buf[start : start + count - skip] = buf[start + skip : start + count]
        self._end += count - skip

    def _make_room(self, need: int) -> None:
        """At least ``need`` free bytes after ``_end``."""
        self._buf, self._pos, self._end = make_room(
            self._buf, self._pos, self._end, need, SCRATCH_BYTES
        )

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as requests."""
        return self._end - self._pos

    @property
    def partial(self) -> bool:
        """True while a request has begun but not been completed."""
        return self._pending is not None or self._drain_left > 0 or self.buffered > 0

    def next_request(self) -> Request | None:
        """The next complete request, or None when more bytes are needed."""
        if self._drain_left:
            return None
        if self._drained is not None:
            request, self._drained = self._drained, None
            return request
        if self._pending is None:
            request = self._read_header()
            if request is None:
                return None
            if request.error is not None and self._drain_left:
                self._drained = request  # answer it once its payload is gone
                return None
            if request.error is not None or not self._payload_len:
                return request
            self._pending = request
        return self._read_payload()

    def _read_header(self) -> Request | None:
        size = self._header.size
        if self._end - self._pos < size:
            return None
        magic, flags, command, cookie, offset, length = self._header.unpack_from(
            self._buf, self._pos
        )
        self._pos += size
        if magic != self._magic:
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        request = Request(command, flags, cookie, offset, length)
        self._payload_len = self._payload_length(request)
        self._after_large = self._payload_len >= max(self._direct_payload, HEADER_ALONE_AFTER)
        if self._payload_len > self._max_payload:
            request.error = invalid(f"payload of {self._payload_len} bytes is too large")
        elif self._payload_len and command != c.NBD_CMD_WRITE:
            request.error = invalid("unexpected payload")
        if request.error is not None and self._payload_len:
            self._discard(self._payload_len)
        return request

    def _payload_length(self, request: Request) -> int:
        if request.command == c.NBD_CMD_WRITE:
            return request.length  # QEMU-tolerant: a WRITE always carries its payload
        if self.extended and request.flags & c.NBD_CMD_FLAG_PAYLOAD_LEN:
            return request.length
        return 0

    def _read_payload(self) -> Request | None:
        request = self._pending
        assert request is not None
        if self._payload_len >= self._direct_payload:
            return self._read_direct(request)
        if self._end - self._pos < self._payload_len:
            return None
        end = self._pos + self._payload_len
        request.data = self._buf[self._pos : end]  # one copy (bytes(slice) made two)
        self._pos = end
        self._pending = None
        return request

    def _read_direct(self, request: Request) -> Request | None:
        if self._direct is None:  # start: take what is buffered, the rest comes in place
            free = self._pool.get(self._payload_len)
            if free:
                self._direct = free.pop()
                self._pooled -= self._payload_len
            else:
                self._direct = bytearray(self._payload_len)
            take = min(self._end - self._pos, self._payload_len)
            with memoryview(self._buf) as view:
                self._direct[:take] = view[self._pos : self._pos + take]
            self._pos += take
            self._filled = take
        if self._filled < self._payload_len:
            return None
        request.data = memoryview(self._direct)
        self._direct = None
        self._pending = None
        return request

    def _discard(self, count: int) -> None:
        take = min(count, self._end - self._pos)
        self._pos += take
        self._drain_left = count - take


@dataclass(frozen=True, slots=True)
class ExportLimits:
    """The facts about an export that request validation depends on."""

    size: int
    read_only: bool
    mode: Mode
    has_contexts: bool
    max_payload: int = c.MAX_PAYLOAD


def check_request(request: Request, limits: ExportLimits) -> None:
    """Raise RequestError if the spec says this request must fail."""
    if request.error is not None:
        raise request.error
    command = request.command
    allowed = _COMMAND_FLAGS.get(command)
    if allowed is None:
        raise invalid(f"unknown command {command}")
    allowed |= c.NBD_CMD_FLAG_FUA
    if limits.mode is Mode.EXTENDED:
        allowed |= c.NBD_CMD_FLAG_PAYLOAD_LEN
    if limits.mode is Mode.SIMPLE:
        allowed &= ~c.NBD_CMD_FLAG_DF
    if request.flags & ~allowed:
        raise invalid(f"flags 0x{request.flags:x} not valid for {c.COMMAND_NAMES[command]}")
    if command in _WRITING and limits.read_only:
        raise RequestError(c.NBD_EPERM, "export is read-only")
    if command in _RANGED and request.offset + request.length > limits.size:
        error = (
            c.NBD_ENOSPC if command in (c.NBD_CMD_WRITE, c.NBD_CMD_WRITE_ZEROES) else c.NBD_EINVAL
        )
        raise RequestError(error, "request past the end of the export")
    if command == c.NBD_CMD_READ and request.length > limits.max_payload:
        raise invalid(f"read of {request.length} bytes is too large")
    if command == c.NBD_CMD_BLOCK_STATUS:
        if not limits.has_contexts:
            raise invalid("no metadata context negotiated")
        if request.length == 0:
            raise invalid("block status of length 0")
