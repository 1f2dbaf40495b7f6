"""The asyncio NBD client: sockets around the sans-IO handshake and reply parser.

This module only moves bytes and wakes waiters: ``ClientHandshake`` decides what to
say during the handshake, ``encode_request``/``ReplyParser`` what goes on the wire
afterwards. Requests are pipelined: each call registers its cookie, writes its whole
request in one go (so requests never interleave), and waits for its own reply, which
may come back in any order.

When the connection dies (the server hangs up, or breaks the protocol and the client
drops it) every pending request fails with ``NBDConnectionError`` (``NBDProtocolError``
for a protocol violation), and so does every later call.

TLS: an ``nbds://`` URI, or an ``ssl.SSLContext`` passed as ``tls``, makes the handshake
start with STARTTLS; when the server acknowledges it, ``_Wire`` upgrades the socket
with ``loop.start_tls`` and the handshake goes on over TLS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Iterable, Mapping
from types import TracebackType

from nbdtrack.client.errors import (
    ClientError,
    NBDConnectionError,
    NBDProtocolError,
    NBDRequestError,
)
from nbdtrack.client.handshake import (
    BlockSize,
    ClientHandshake,
    ExportEntry,
    ExportInfo,
    ListExports,
    ListMetaContexts,
    Negotiate,
    Plan,
)
from nbdtrack.client.tls import client_context
from nbdtrack.client.transmission import Extent, Reply, ReplyParser, encode_request
from nbdtrack.client.uri import NBDAddress, resolve_address
from nbdtrack.protocol import constants as c
from nbdtrack.protocol.events import Mode

Target = str | os.PathLike[str] | tuple[str, int] | NBDAddress
DEFAULT_TIMEOUT = 30.0
_COOKIE_MASK = 0xFFFFFFFFFFFFFFFF
_HANDSHAKE_BUFFER = 64 * 1024


class _Wire(asyncio.BufferedProtocol):
    """The socket of one connection; hands bytes to the handshake, then to the client.

    A ``BufferedProtocol``: in transmission the socket reads into the reply parser's own
    buffers (``ReplyParser.get_buffer``), a large READ's data straight into its
    destination, instead of into a new ``bytes`` per read that is then copied."""

    def __init__(
        self,
        handshake: ClientHandshake,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.handshake = handshake
        self.tls = tls
        self.server_hostname = server_hostname
        self.tls_version: str | None = None
        self._tls_task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None
        self.client: NBDClient | None = None
        self.handshake_done: asyncio.Future[object] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.lost_reason: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._loop = loop
        self._queued: list[bytes | bytearray | memoryview] = []  # see write()
        self._handshake_buffer = bytearray(_HANDSHAKE_BUFFER)

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_handshake_output()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.client is not None:
            return self.client._parser.get_buffer()
        return memoryview(self._handshake_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        if self.client is not None:
            self.client._buffer_updated(nbytes)
        else:
            self._handshake_data(bytes(self._handshake_buffer[:nbytes]))

    def _handshake_data(self, data: bytes) -> None:
        try:
            self.handshake.receive_data(data)
        except ClientError as err:
            if not self.handshake_done.done():
                self.handshake_done.set_exception(err)
            self.abort()
            return
        self.send_handshake_output()
        if self.handshake.tls_requested and self._tls_task is None:
            assert self.transport is not None
            self.transport.pause_reading()  # no plaintext byte may follow; start_tls resumes
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
        if self.handshake.done and not self.handshake_done.done():
            self.handshake_done.set_result(self.handshake.result)

    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self.tls is not None
        try:
            upgraded = await asyncio.get_running_loop().start_tls(
                transport, self, self.tls, server_hostname=self.server_hostname
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as err:
            if not self.handshake_done.done():
                reason = getattr(err, "reason", None) or str(err) or type(err).__name__
                self.handshake_done.set_exception(
                    NBDConnectionError(f"TLS handshake failed: {reason}")
                )
            transport.abort()
            return
        self.transport = upgraded
        ssl_object = upgraded.get_extra_info("ssl_object")
        self.tls_version = ssl_object.version() if ssl_object is not None else None
        try:
            self.handshake.tls_established()
        except ClientError as err:
            if not self.handshake_done.done():
                self.handshake_done.set_exception(err)
            self.abort()
            return
        self.send_handshake_output()
        if self.handshake.done and not self.handshake_done.done():
            self.handshake_done.set_result(self.handshake.result)

    def eof_received(self) -> bool:
        return False  # a half-closed NBD connection is of no use: close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = exc
        self._writable.set()  # wake writers: they will find the connection closed
        if not self.handshake_done.done():
            reason = f": {exc}" if exc else ""
            self.handshake_done.set_exception(
                NBDConnectionError(f"the server closed the connection during the handshake{reason}")
            )
        if self.client is not None:
            self.client._connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- used by the client -------------------------------------------------------

    def send_handshake_output(self) -> None:
        out = self.handshake.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    async def writable(self) -> None:
        await self._writable.wait()

    def write(self, *buffers: bytes | bytearray | memoryview) -> None:
        """Send a request. Requests without a payload are queued: what is queued in one
        pass of the event loop goes out in one system call, so 16 pipelined READs wake the
        server once, not 16 times. One with a payload goes at once (after the queue), so
        the transport's flow control sees its size."""
        assert self.transport is not None
        if len(buffers) == 1:
            if not self._queued:
                self._loop.call_soon(self.flush)
            self._queued.append(buffers[0])
            return
        self.flush()
        self.transport.writelines(buffers)

    def flush(self) -> None:
        """Hand the queued requests to the transport, which sends what it can at once."""
        queued, self._queued = self._queued, []
        if queued and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(queued)

    def close(self) -> None:
        """Close after the queued and buffered bytes went out."""
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close now: what the socket does not take at once is dropped."""
        self.flush()
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_lost(self) -> bool:
        return self.closed.done()


def _tls_for(address: NBDAddress, tls: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The context to use: the caller's, else one built from an nbds URI's parameters."""
    if tls is not None or not address.tls:
        return tls
    return client_context(address.tls_certificates, address.tls_verify_peer)


async def _open(
    address: NBDAddress, plan: Plan, timeout: float | None, tls: ssl.SSLContext | None = None
) -> tuple[_Wire, object]:
    """Connect and run one handshake plan to its end (over TLS when ``tls`` is given)."""
    loop = asyncio.get_running_loop()
    context = _tls_for(address, tls)
    hostname = address.tls_hostname or address.host or "localhost"
    wire = _Wire(ClientHandshake(plan, starttls=context is not None), context, hostname)
    try:
        async with asyncio.timeout(timeout):
            try:
                if address.socket is not None:
                    await loop.create_unix_connection(lambda: wire, address.socket)
                else:
                    await loop.create_connection(lambda: wire, address.host, address.port)
            except OSError as err:
                raise NBDConnectionError(f"cannot connect to {address.uri()}: {err}") from err
            result = await wire.handshake_done
    except TimeoutError:
        wire.abort()
        raise NBDConnectionError(f"{address.uri()}: handshake timed out") from None
    except BaseException:
        wire.abort()
        raise
    return wire, result


async def connect(
    target: Target,
    export: str | None = None,
    *,
    structured: bool = True,
    extended: bool = True,
    meta_contexts: Iterable[str] = (),
    full_info: bool = True,
    go: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> NBDClient:
    """Connect to an NBD server and enter transmission on one export.

    ``target`` is an ``nbd://`` / ``nbd+unix://`` URI, a ``(host, port)`` tuple, a unix
    socket path or an ``NBDAddress``; ``export`` overrides the URI's export name.
    ``extended``/``structured`` pick the best reply style the server agrees to (each
    refusal falls back to the next, down to simple replies); ``meta_contexts`` are
    requested with SET_META_CONTEXT (the ids the server gives are in ``contexts``).
    ``go=False`` enters with NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. ``timeout``
    bounds connecting plus the handshake. ``tls`` (or an ``nbds://`` URI, see
    ``client.tls.client_context``) makes TLS mandatory: a server that refuses STARTTLS
    fails the connection with ``NBDOptionError``.
    """
    address = resolve_address(target, export)
    plan = Negotiate(
        export=address.export,
        structured=structured,
        extended=extended,
        meta_contexts=tuple(meta_contexts),
        full_info=full_info,
        go=go,
    )
    wire, info = await _open(address, plan, timeout, tls)
    assert isinstance(info, ExportInfo)
    return NBDClient(wire, info)


async def list_exports(
    target: Target,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> list[ExportEntry]:
    """The exports the server lists (NBD_OPT_LIST), as (name, description) entries."""
    wire, result = await _open(resolve_address(target), ListExports(), timeout, tls)
    await _hang_up(wire)
    assert isinstance(result, list)
    return result


async def list_meta_contexts(
    target: Target,
    export: str | None = None,
    queries: Iterable[str] = (),
    *,
    structured: bool = True,
    extended: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> list[str]:
    """The metadata contexts an export offers (NBD_OPT_LIST_META_CONTEXT).

    No queries lists everything selectable; a query ending in ``:`` lists a namespace.
    Structured replies are negotiated first, as qemu-nbd ``-L`` and nbdinfo do, since
    some servers only answer then.
    """
    address = resolve_address(target, export)
    plan = ListMetaContexts(address.export, tuple(queries), structured, extended)
    wire, result = await _open(address, plan, timeout, tls)
    await _hang_up(wire)
    assert isinstance(result, list)
    return result


async def _hang_up(wire: _Wire) -> None:
    """After NBD_OPT_ABORT: let it go out, close, wait until the socket is gone."""
    wire.send_handshake_output()
    wire.close()
    await wire.closed


class NBDClient:
    """One NBD connection in transmission. Create it with ``connect()``.

    Every request method may be called concurrently from many tasks: the requests are
    pipelined on the one connection. Server errors raise ``NBDRequestError``.
    """

    def __init__(self, wire: _Wire, info: ExportInfo) -> None:
        self._wire = wire
        self._info = info
        self._parser = ReplyParser(info.mode, info.size, [ctx.id for ctx in info.contexts])
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._next_cookie = 1
        self._error: NBDConnectionError | None = None
        self._context_names = {ctx.id: ctx.name for ctx in info.contexts}
        # Switch the socket over to us; bytes that came after the handshake go first.
        wire.client = self
        trailing = wire.handshake.trailing_data
        if trailing:
            self._data_received(trailing)
        if wire.is_lost:
            self._connection_lost(wire.lost_reason)

    # --- what the handshake negotiated ------------------------------------------------

    @property
    def info(self) -> ExportInfo:
        return self._info

    @property
    def export_name(self) -> str:
        return self._info.name

    @property
    def description(self) -> str:
        return self._info.description

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def transmission_flags(self) -> int:
        """NBD_FLAG_* as the server sent them; the ``can_*`` properties read them."""
        return self._info.flags

    @property
    def block_size(self) -> BlockSize:
        return self._info.block_size

    @property
    def mode(self) -> Mode:
        return self._info.mode

    @property
    def tls_version(self) -> str | None:
        """"TLSv1.3" and the like when the connection runs over TLS, else None."""
        return self._wire.tls_version

    @property
    def contexts(self) -> Mapping[str, int]:
        """Negotiated metadata contexts: name -> the id the server gave."""
        return {ctx.name: ctx.id for ctx in self._info.contexts}

    def _has(self, flag: int) -> bool:
        return bool(self._info.flags & flag)

    @property
    def read_only(self) -> bool:
        return self._has(c.NBD_FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_FAST_ZERO)

    @property
    def can_df(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_DF)

    @property
    def can_cache(self) -> bool:
        return self._has(c.NBD_FLAG_SEND_CACHE)

    @property
    def can_multi_conn(self) -> bool:
        return self._has(c.NBD_FLAG_CAN_MULTI_CONN)

    # --- state ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once no more requests can be sent."""
        return self._error is not None

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._waiters)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.in_flight} in flight"
        return (
            f"<NBDClient export={self.export_name!r} size={self.size} "
            f"mode={self.mode.name.lower()} {state}>"
        )

    # --- requests ---------------------------------------------------------------------

    async def pread(
        self, length: int, offset: int, *, df: bool = False, fua: bool = False
    ) -> bytes:
        """Read ``length`` bytes; ``df`` asks for one unfragmented chunk."""
        flags = (c.NBD_CMD_FLAG_DF if df else 0) | (c.NBD_CMD_FLAG_FUA if fua else 0)
        reply = await self._submit(c.NBD_CMD_READ, flags, offset, length)
        assert reply.data is not None
        return reply.data

    async def pread_into(
        self, buf: bytearray | memoryview, offset: int, *, df: bool = False, fua: bool = False
    ) -> None:
        """Read ``len(buf)`` bytes into ``buf`` (holes as zeros): no buffer is made for
        the data, and much of it goes from the socket straight into ``buf``. ``buf``
        is not written to once this returns or is cancelled; after an error its contents
        are undefined."""
        flags = (c.NBD_CMD_FLAG_DF if df else 0) | (c.NBD_CMD_FLAG_FUA if fua else 0)
        view = memoryview(buf).cast("B")
        await self._submit(c.NBD_CMD_READ, flags, offset, view.nbytes, into=view)

    async def pwrite(
        self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False
    ) -> None:
        """Write ``data``; ``fua`` makes it durable before the reply."""
        flags = c.NBD_CMD_FLAG_FUA if fua else 0
        if self.mode is Mode.EXTENDED:
            flags |= c.NBD_CMD_FLAG_PAYLOAD_LEN  # mandatory on WRITE with extended headers
        payload = memoryview(data).cast("B")
        await self._submit(c.NBD_CMD_WRITE, flags, offset, payload.nbytes, payload)

    async def flush(self) -> None:
        """Make every write already answered durable."""
        await self._submit(c.NBD_CMD_FLUSH, 0, 0, 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Hint that a range is unused (the server may ignore it)."""
        await self._submit(c.NBD_CMD_TRIM, c.NBD_CMD_FLAG_FUA if fua else 0, offset, length)

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Make a range read as zeros (WRITE_ZEROES).

        ``no_hole`` keeps it allocated; ``fast`` asks the server to fail with NBD_ENOTSUP
        rather than zero slowly.
        """
        flags = (
            (c.NBD_CMD_FLAG_NO_HOLE if no_hole else 0)
            | (c.NBD_CMD_FLAG_FAST_ZERO if fast else 0)
            | (c.NBD_CMD_FLAG_FUA if fua else 0)
        )
        await self._submit(c.NBD_CMD_WRITE_ZEROES, flags, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        """Ask the server to prefetch a range."""
        await self._submit(c.NBD_CMD_CACHE, 0, offset, length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        """Extents of every negotiated context from ``offset``: name -> [(length, flags)].

        The extents may cover less than ``length`` (and, without ``req_one``, the last
        one may reach past it, never past the export end): callers loop on the sum.
        Compact requests carry 32-bit lengths, so ``length`` is clipped to under 4 GiB
        unless extended headers are on.
        """
        if self.mode is not Mode.EXTENDED:
            length = min(length, (1 << 32) - max(self.block_size.minimum, 512))
        flags = c.NBD_CMD_FLAG_REQ_ONE if req_one else 0
        reply = await self._submit(c.NBD_CMD_BLOCK_STATUS, flags, offset, length)
        assert reply.extents is not None
        return {self._context_names[cid]: extents for cid, extents in reply.extents.items()}

    async def request(
        self,
        command: int,
        *,
        flags: int = 0,
        offset: int = 0,
        length: int | None = None,
        payload: bytes | bytearray | memoryview | None = None,
        check: bool = True,
    ) -> Reply:
        """Send any request exactly as given: the escape hatch for testing servers.

        Nothing is added or checked (no PAYLOAD_LEN on extended WRITEs, no flag
        validation); ``length`` defaults to the payload's size. With ``check`` an error
        reply raises ``NBDRequestError``; without it the ``Reply`` is returned as is.
        """
        if length is None:
            length = memoryview(payload).nbytes if payload is not None else 0
        return await self._submit(command, flags, offset, length, payload, check=check)

    async def _submit(
        self,
        command: int,
        flags: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | memoryview | None = None,
        *,
        check: bool = True,
        into: memoryview | None = None,
    ) -> Reply:
        self._check_open()
        cookie = self._next_cookie
        header = encode_request(self.mode, command, flags, cookie, offset, length)
        self._next_cookie = (cookie + 1) & _COOKIE_MASK or 1
        # Registered before waiting for the socket, so disconnect() waits for it too.
        self._parser.expect(cookie, command, flags, offset, length, into)
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[cookie] = waiter
        try:
            await self._wire.writable()
        except BaseException:
            self._waiters.pop(cookie, None)
            self._parser.forget(cookie)
            raise
        if not waiter.done():  # done: the connection died while we waited
            # Nothing awaits between here and the write: the request goes out whole.
            if payload is None:
                self._wire.write(header)
            else:
                self._wire.write(header, payload)
        try:
            reply = await waiter
        except BaseException:
            if into is not None:  # the caller's buffer is its own again
                self._parser.drop_into(cookie)
            raise
        if check and reply.error:
            raise NBDRequestError(
                reply.error, reply.message, command=command, offset=reply.error_offset
            )
        return reply

    def _check_open(self) -> None:
        if self._error is not None:
            raise NBDConnectionError(f"connection closed: {self._error}") from self._error

    # --- ending -----------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Wait for the requests in flight, send NBD_CMD_DISC, close: the polite way out."""
        if self._error is None:
            self._error = NBDConnectionError("the client disconnected")  # no new requests
            pending = list(self._waiters.values())
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            if not self._wire.is_lost:
                cookie = self._next_cookie
                self._wire.write(encode_request(self.mode, c.NBD_CMD_DISC, 0, cookie, 0, 0))
                self._wire.close()
        await self._wire.closed

    async def close(self) -> None:
        """Close the connection at once, without NBD_CMD_DISC; pending requests fail."""
        self._fail(NBDConnectionError("the client closed the connection"))
        self._wire.close()
        await self._wire.closed

    async def abort(self) -> None:
        """Drop the connection like a crashing client: unsent bytes are discarded, so the
        server may see half a request."""
        self._fail(NBDConnectionError("the client aborted the connection"))
        self._wire.abort()
        await self._wire.closed

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.disconnect()
        else:
            await self.close()

    # --- called by the wire -----------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        """Bytes that came with the end of the handshake."""
        self._parser.receive_data(data)
        self._deliver()

    def _buffer_updated(self, nbytes: int) -> None:
        self._parser.buffer_updated(nbytes)
        self._deliver()

    def _deliver(self) -> None:
        """Wake the waiter of every reply the parser has finished."""
        try:
            while (reply := self._parser.next_reply()) is not None:
                waiter = self._waiters.pop(reply.cookie, None)
                if waiter is not None and not waiter.done():  # done: its caller gave up
                    waiter.set_result(reply)
        except NBDProtocolError as err:
            self._fail(err)
            self._wire.abort()

    def _connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(NBDConnectionError(f"the server closed the connection{reason}"))

    def _fail(self, error: NBDConnectionError) -> None:
        """The connection is unusable: fail every waiter, and every later request."""
        if self._error is None:
            self._error = error
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
