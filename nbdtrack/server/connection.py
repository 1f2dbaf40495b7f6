"""One client connection: an asyncio protocol that drives the sans-IO core.

Bytes from the socket go to the handshake, then to the request parser; each request
runs as its own task (backend calls in worker threads), and its whole reply is written
with one ``writelines`` so replies never interleave. Reading pauses while too many
requests or bytes are in flight, while handshake replies pile up unread, and a reply
waits while the socket's send buffer is full, so a client that floods or stops reading
cannot grow memory without bound.

STARTTLS: the handshake emits ``StartTLS`` after queueing its ACK; reading stops at
once (no plaintext byte may reach the handshake after it), ``loop.start_tls`` upgrades
the socket, the client certificate is checked against the allow-list, and the
handshake goes on over TLS.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, cast

from nbdtrack.protocol import constants as c
from nbdtrack.protocol.errors import ProtocolError, RequestError, nbd_error
from nbdtrack.protocol.events import (
    HandshakeAborted,
    Mode,
    Request,
    StartTLS,
    TransmissionReady,
)
from nbdtrack.protocol.handshake import Phase, ServerHandshake
from nbdtrack.protocol.replies import Buffers, ReadPiece, ReplyEncoder, shape_extents
from nbdtrack.protocol.requests import ExportLimits, RequestParser, check_request
from nbdtrack.server.tls import allowed_subject, format_subject, subject_attributes
from nbdtrack.server.vectored import VectoredWriter
from nbdtrack.storage.backend import STATE_ZERO

if TYPE_CHECKING:
    from nbdtrack.exports import Export
    from nbdtrack.server.server import NBDServer

log = logging.getLogger("nbdtrack.connection")

MAX_REQUESTS_IN_FLIGHT = 128
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # default of NBDServer(max_bytes_in_flight=...)
REPLY_BATCH_BYTES = 1024 * 1024  # replies served at once are sent in batches of this
HANDSHAKE_READ = 64 * 1024  # bytes read at a time before transmission
SERVED_AT_ONCE = frozenset((c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_BLOCK_STATUS))


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.handshake: ServerHandshake | None = ServerHandshake(
            server.registry,
            tls=server.tls.mode,
            max_option_length=server.limits.max_option_length,
            max_name_length=server.limits.max_name_length,
            admit=server.admit,
        )
        self.parser: RequestParser | None = None
        self.export: Export | None = None
        self.encoder: ReplyEncoder | None = None
        self.limits: ExportLimits | None = None
        self.contexts: tuple = ()
        self.tasks: set[asyncio.Task] = set()
        self.in_flight_bytes = 0
        self.reading_paused = False
        self.disconnecting = False
        self.shutting_down = False
        self.closed = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._writable.set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_received = time.monotonic()
        self._write_blocked_since: float | None = None
        self.tls_subject: str | None = None  # the verified client certificate's subject
        # Decrypted bytes that arrive before start_tls() returns to us (the client's
        # first option right after its Finished): fed once the handshake knows.
        self._tls_early = bytearray()
        self.counted_export: str | None = None  # counted against its connection limit
        self._scratch = bytearray(HANDSHAKE_READ)  # what get_buffer offers outside transmission
        self._writer: VectoredWriter | None = None  # replies, once in transmission
        self._into_parser = False  # what the last get_buffer handed out

    # --- asyncio.BufferedProtocol ------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        """In transmission, the request parser's buffer: a large WRITE payload is received
        straight into its own buffer. Before that (handshake, STARTTLS), a scratch buffer."""
        parser = self.parser
        self._into_parser = parser is not None and self.handshake is None and not self.disconnecting
        if self._into_parser:
            assert parser is not None
            return parser.get_buffer(sizehint)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_received = time.monotonic()
        if self.transport is None or self.transport.is_closing():
            return  # a TLS transport still hands over what it decrypts while closing
        try:
            if self._into_parser:
                assert self.parser is not None
                self.parser.buffer_updated(nbytes)
                self._dispatch_requests()
            elif self._tls_pending:
                # Reading was paused on the plaintext socket at STARTTLS, so whatever
                # comes now came through the TLS layer.
                self._tls_early += memoryview(self._scratch)[:nbytes]
            elif self.handshake is not None:
                self._handshake_data(bytes(memoryview(self._scratch)[:nbytes]))
        except ProtocolError as err:
            log.warning("%s: protocol error, closing: %s", self.peer, err)
            if self.handshake is not None and self.transport is not None:
                # Replies to the options before the bad one still go out (close flushes).
                self.transport.write(self.handshake.data_to_send())
            self._close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = format_peer(peer)
        assert self.handshake is not None
        transport.write(self.handshake.data_to_send())
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_expired
        )
        log.debug("connection from %s", self.peer)

    def eof_received(self) -> bool:
        if self.parser is not None and self.parser.partial:
            log.warning("%s: end of file inside a request; it is dropped", self.peer)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._writable.set()  # wake replies waiting for the socket; they see it closed
        if self._writer is not None:
            self._writer.close()
        if not self.closed.done():
            self.closed.set_result(None)
        self.server.connection_closed(self)
        if self.export is not None:
            log.info("%s: disconnected from export '%s'", self.peer, self.export.name)

    def pause_writing(self) -> None:
        self._writable.clear()
        self._write_blocked_since = time.monotonic()
        if self.handshake is not None:
            # Option replies the client does not read: stop reading its options.
            self._pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        self._write_blocked_since = None
        if self.handshake is not None and not self._tls_pending:
            self._resume_reading()

    @property
    def _tls_pending(self) -> bool:
        return self.handshake is not None and self.handshake.phase is Phase.STARTING_TLS

    # --- handshake ----------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        hs.receive_data(data)
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        event = hs.next_event()
        if isinstance(event, HandshakeAborted):
            self._close()
        elif isinstance(event, StartTLS):
            self._pause_reading()  # nothing more in plaintext; start_tls resumes reading
            self._spawn(self._start_tls())
        elif isinstance(event, TransmissionReady):
            self._start_transmission(event, hs.trailing_data)

    async def _start_tls(self) -> None:
        """Upgrade the socket after the STARTTLS ACK, then check the client's certificate."""
        transport, tls = self.transport, self.server.tls
        assert transport is not None and tls.context is not None
        loop = asyncio.get_running_loop()
        try:
            upgraded = await loop.start_tls(
                transport,
                self,
                tls.context,
                server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as err:
            log.warning("%s: TLS handshake failed: %s", self.peer, _tls_reason(err))
            self._close()
            return
        if upgraded is None or self.handshake is None:
            return  # closed meanwhile
        self.transport = upgraded
        self.reading_paused = False  # start_tls resumed reading on the new transport
        ssl_object = upgraded.get_extra_info("ssl_object")
        peercert = ssl_object.getpeercert() if ssl_object is not None else None
        if peercert:
            self.tls_subject = format_subject(subject_attributes(peercert))
        if tls.allow and not (peercert and allowed_subject(peercert, tls.allow)):
            log.warning(
                "%s: client certificate '%s' is not on the TLS allow-list, closing",
                self.peer,
                self.tls_subject or "(none)",
            )
            self._close()
            return
        log.info(
            "%s: TLS established (%s%s)",
            self.peer,
            ssl_object.version() if ssl_object is not None else "?",
            f", client '{self.tls_subject}'" if self.tls_subject else "",
        )
        try:
            self.handshake.tls_started()
            early, self._tls_early = bytes(self._tls_early), bytearray()
            if early:
                self._handshake_data(early)
        except ProtocolError as err:
            log.warning("%s: protocol error, closing: %s", self.peer, err)
            self._close()

    def _start_transmission(self, ready: TransmissionReady, trailing: bytes) -> None:
        self.handshake = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        export = self.server.registry.lookup(ready.export_name)
        assert export is not None
        self.export = export
        self.server.export_opened(self, export)
        if self.server.limits.idle_timeout:
            self._arm_idle_timer(self.server.limits.idle_timeout)
        self.contexts = ready.contexts
        self.encoder = ReplyEncoder(ready.mode)
        self.limits = ExportLimits(
            size=export.size,
            read_only=export.read_only,
            mode=ready.mode,
            has_contexts=bool(ready.contexts),
        )
        self.parser = RequestParser(ready.mode)
        assert self.transport is not None
        self._writer = VectoredWriter(self.transport)  # TLS, if any, is on by now
        self._resume_reading()  # it may have paused for unread handshake replies
        log.info(
            "%s: serving export '%s' (%s replies%s)",
            self.peer,
            export.name,
            ready.mode.name.lower(),
            "".join(f", {ctx.name}" for ctx in ready.contexts),
        )
        if trailing:
            self.parser.receive_data(trailing)
            self._dispatch_requests()

    def _handshake_expired(self) -> None:
        if self.handshake is not None:
            log.warning("%s: handshake timed out", self.peer)
            self._close()

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """Close a connection that sent nothing with nothing in flight, or that has not
        read its replies, for ``idle_timeout`` seconds."""
        self._idle_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        limit = self.server.limits.idle_timeout
        now = time.monotonic()
        if self._write_blocked_since is not None and now - self._write_blocked_since >= limit:
            log.warning("%s: replies unread for %.0f s, closing", self.peer, limit)
            self._close()
            return
        if not self.tasks and now - self._last_received >= limit:
            log.info("%s: idle for %.0f s, closing", self.peer, limit)
            self._close()
            return
        since = self._last_received if not self.tasks else now
        if self._write_blocked_since is not None:
            since = min(since, self._write_blocked_since)
        self._arm_idle_timer(max(0.05, since + limit - now))

    # --- transmission -------------------------------------------------------------

    def _dispatch_requests(self) -> None:
        parser = self.parser
        assert parser is not None
        replies: Buffers = []  # of the requests served at once, sent together below
        batched = 0
        while not self.disconnecting:
            request = parser.next_request()
            if request is None:
                break
            if request.command == c.NBD_CMD_DISC and request.error is None:
                self.disconnecting = True
                self._pause_reading()
                self._spawn(self._disconnect())
                break
            if self._serve_now(request, replies):
                batched += request_bytes(request)
                if batched >= REPLY_BATCH_BYTES:  # the transport's buffer says when to stop
                    self._send(replies)
                    replies, batched = [], 0
                continue
            self.in_flight_bytes += request_bytes(request)
            self._spawn(self._serve(request))
        self._send(replies)
        self._apply_backpressure()

    def _send(self, replies: Buffers) -> None:
        if replies and self.transport is not None and not self.transport.is_closing():
            assert self._writer is not None
            self._writer.writelines(replies)

    def _serve_now(self, request: Request, replies: Buffers) -> bool:
        """Serve a cached READ, a small WRITE to dirty granules or a BLOCK_STATUS that
        needs no I/O without a task.

        Their replies leave together once the data received has been parsed: one send
        for all the requests that arrived in it. Everything else (and anything while the
        socket is full, since a task then waits for it) is a task's, as is any request
        ``check_request`` refuses, so that errors have one path.
        """
        cmd = request.command
        if (
            request.error is not None
            or cmd not in SERVED_AT_ONCE
            or request.flags & c.NBD_CMD_FLAG_FUA
            or not request.length
            or self.shutting_down
            or not self._writable.is_set()
        ):
            return False
        export, limits, encoder = self.export, self.limits, self.encoder
        assert export is not None and limits is not None and encoder is not None
        try:
            check_request(request, limits)
        except RequestError:
            return False
        backend, offset, length = export.backend, request.offset, request.length
        if cmd == c.NBD_CMD_READ:
            sparse = limits.mode is not Mode.SIMPLE and not request.flags & c.NBD_CMD_FLAG_DF
            pieces = read_now(backend, offset, length, sparse)
            if pieces is None:
                return False
            replies += encoder.read(request.cookie, offset, pieces)
        elif cmd == c.NBD_CMD_BLOCK_STATUS:
            try:
                answers = self._block_status(request, wait=False)
            except RequestError:
                return False
            if answers is None:
                return False
            replies += encoder.block_status(request.cookie, offset, answers)
        else:
            data = request.data
            assert data is not None
            try:
                if not backend.pwrite_now(data, offset):
                    return False
                replies += encoder.ok(request.cookie, offset)
            except OSError as err:
                replies += self._error_reply(request, err)
            assert self.parser is not None
            self.parser.recycle(data)
        export.stats.count(cmd, length)
        return True

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _apply_backpressure(self) -> None:
        busy = (
            len(self.tasks) >= MAX_REQUESTS_IN_FLIGHT
            or self.in_flight_bytes >= self.server.limits.max_bytes_in_flight
        )
        if busy:
            self._pause_reading()
        elif not self.disconnecting:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    async def _serve(self, request: Request) -> None:
        encoder = self.encoder
        assert encoder is not None
        try:
            if self.shutting_down:
                raise RequestError(c.NBD_ESHUTDOWN, "server is shutting down")
            buffers = await self._execute(request)
        except RequestError as err:
            buffers = encoder.error(request.cookie, err.error, err.message, request.offset)
        except OSError as err:
            buffers = self._error_reply(request, err)
        except Exception:  # a bug must fail one request, not the server
            log.exception("%s: internal error serving a request", self.peer)
            buffers = encoder.error(request.cookie, c.NBD_EIO, "internal error", request.offset)
        try:
            await self._write(buffers)
        finally:
            self.in_flight_bytes -= request_bytes(request)
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._apply_backpressure()

    def _error_reply(self, request: Request, err: OSError) -> Buffers:
        """An I/O error as the NBD error the client can act on, and one log line."""
        assert self.encoder is not None
        log.warning(
            "%s: %s at %d+%d failed: %s",
            self.peer,
            c.COMMAND_NAMES.get(request.command, request.command),
            request.offset,
            request.length,
            err,
        )
        return self.encoder.error(
            request.cookie, nbd_error(err.errno), err.strerror or str(err), request.offset
        )

    async def _write(self, buffers: Buffers) -> None:
        await self._writable.wait()
        self._send(buffers)

    async def _execute(self, request: Request) -> Buffers:
        export, limits, encoder = self.export, self.limits, self.encoder
        assert export is not None and limits is not None and encoder is not None
        check_request(request, limits)
        backend = export.backend
        run = self.server.run_blocking
        cmd, offset, length = request.command, request.offset, request.length
        export.stats.count(cmd, length)
        fua = bool(request.flags & c.NBD_CMD_FLAG_FUA)
        if cmd == c.NBD_CMD_READ:
            sparse = limits.mode is not Mode.SIMPLE and not request.flags & c.NBD_CMD_FLAG_DF
            # Cached data is read right here; anything else (FUA's flush too) in a worker.
            pieces = None if fua else read_now(backend, offset, length, sparse)
            if pieces is None:
                pieces = await run(read_pieces, export, offset, length, sparse, fua)
            return encoder.read(request.cookie, offset, pieces)
        if cmd == c.NBD_CMD_WRITE:
            if length:  # a zero-length WRITE carries no payload (data is None): a no-op
                data = request.data
                assert data is not None and self.parser is not None
                # A small write into the page cache is made right here, like a cached read.
                if fua or not backend.pwrite_now(data, offset):
                    await run(backend.pwrite, data, offset, fua)
                self.parser.recycle(data)  # only once written: a cancelled wait leaves it in use
        elif cmd == c.NBD_CMD_FLUSH:
            await run(backend.flush)
        elif cmd == c.NBD_CMD_TRIM:
            if length:
                await run(backend.trim, offset, length, fua)
        elif cmd == c.NBD_CMD_WRITE_ZEROES:
            if length:
                await run(
                    lambda: backend.zero(
                        offset,
                        length,
                        may_trim=not request.flags & c.NBD_CMD_FLAG_NO_HOLE,
                        fast=bool(request.flags & c.NBD_CMD_FLAG_FAST_ZERO),
                        fua=fua,
                    )
                )
        elif cmd == c.NBD_CMD_CACHE:
            if length:
                await run(backend.cache, offset, length)
        elif cmd == c.NBD_CMD_BLOCK_STATUS:
            answers = await run(self._block_status, request)
            return encoder.block_status(request.cookie, offset, answers)
        return encoder.ok(request.cookie, offset)

    def _block_status(self, request: Request, wait: bool = True):
        """``block_status`` of a request on this connection's export and contexts."""
        assert self.export is not None
        return block_status(
            self.export,
            self.contexts,
            request.offset,
            request.length,
            bool(request.flags & c.NBD_CMD_FLAG_REQ_ONE),
            self.server.limits.max_extents,
            wait,
        )

    async def _disconnect(self) -> None:
        """NBD_CMD_DISC: finish what is in flight, flush, close."""
        current = asyncio.current_task()
        pending = [t for t in self.tasks if t is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await self._flush_quietly()
        self._close()

    async def _flush_quietly(self) -> None:
        if self.export is not None and not self.export.read_only:
            try:
                await self.server.run_blocking(self.export.backend.flush)
            except OSError as err:
                log.warning("%s: flush at disconnect failed: %s", self.peer, err)

    async def shutdown(self) -> None:
        """Server shutdown: refuse new requests with ESHUTDOWN, finish the rest, close."""
        self.shutting_down = True
        if self.handshake is not None:
            self._close()
            return
        # Requests arriving meanwhile get ESHUTDOWN: their replies are waited for too.
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self._close()
        await self.closed  # every reply has left (the server bounds this wait)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.reading_paused:
                # asyncio's TLS transport (3.11) defers an end of file that arrives while
                # reading is paused, and then never finishes closing: resume first.
                self.reading_paused = False
                self.transport.resume_reading()
            self.transport.close()


def request_bytes(request: Request) -> int:
    """Bytes a request holds in memory until answered (its payload or its read data)."""
    if request.command in (c.NBD_CMD_READ, c.NBD_CMD_WRITE):
        return request.length
    return 0


def read_pieces(
    export: Export, offset: int, length: int, sparse: bool, fua: bool
) -> list[ReadPiece]:
    """The data of a READ; with ``sparse``, zero ranges become holes (OFFSET_HOLE)."""
    backend = export.backend
    if fua:
        backend.flush()
    if length == 0:
        return []
    if not sparse or not backend.can_extents() or not backend.may_have_holes():
        return [ReadPiece(offset, length, checked_pread(backend, length, offset))]
    pieces = []
    pos = offset
    for ext_length, flags in backend.extents(offset, length):
        ext_length = min(ext_length, offset + length - pos)
        if ext_length <= 0:
            break
        if flags & STATE_ZERO:
            pieces.append(ReadPiece(pos, ext_length, None))
        else:
            pieces.append(ReadPiece(pos, ext_length, checked_pread(backend, ext_length, pos)))
        pos += ext_length
    if pos < offset + length:  # extents fell short: read the rest as data
        rest = offset + length - pos
        pieces.append(ReadPiece(pos, rest, checked_pread(backend, rest, pos)))
    return pieces


READ_NOW_MAX = 1024 * 1024  # larger READs are copied in a worker (see read_now)


def read_now(backend, offset: int, length: int, sparse: bool) -> list[ReadPiece] | None:
    """A READ's data if the backend has it without blocking, else None (use a worker).

    On the event loop thread: it skips the hand-off to a worker and back, which costs
    more than a cached 4K read, and since replies leave by ``sendmsg`` without a join,
    more than the ~0.1 ms a cached 1 MiB copy holds the loop (bench/README.md).
    Larger reads still go to a worker, so that one request cannot hold up the other
    connections for long. A hole search (``lseek``) may block, so sparse reads of a
    backend that may have holes always go to the worker.
    """
    if not 0 < length <= READ_NOW_MAX or (
        sparse and backend.can_extents() and backend.may_have_holes()
    ):
        return None
    data = backend.pread_nowait(length, offset)
    return None if data is None else [ReadPiece(offset, length, data)]


def checked_pread(backend, length: int, offset: int) -> bytes:
    """``backend.pread``, refusing a short result: sending it would desync the stream."""
    data = backend.pread(length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read from storage ({len(data)} of {length} bytes)")
    return data


def block_status(
    export: Export,
    contexts,
    offset: int,
    length: int,
    req_one: bool,
    max_extents: int = c.MAX_EXTENTS,
    wait: bool = True,
):
    """One (context id, extents) answer per negotiated context; with ``wait=False``,
    None if a context cannot answer without I/O (see ``Export.context_extents``)."""
    length = min(length, export.size - offset)
    limit = 1 if req_one else max_extents
    answers = []
    for ctx in contexts:
        try:
            found = export.context_extents(ctx.name, offset, length, limit, wait)
        except KeyError:
            raise RequestError(c.NBD_EINVAL, f"{ctx.name} no longer exists") from None
        if found is None:
            return None
        extents = shape_extents(found, length, req_one, limit)
        if not extents:
            raise RequestError(c.NBD_EIO, f"no extents for {ctx.name}")
        answers.append((ctx.id, extents))
    return answers


def _tls_reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return err.reason.lower().replace("_", " ")
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__


def format_peer(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "unix" if not peer else str(peer)
