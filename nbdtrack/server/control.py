"""The control socket: a unix socket speaking QMP, driving ``nbdtrack.control`` sessions.

The socket is created mode 0600 (it can change every bitmap), or 0660 when a group is
configured to share it, chown-ed and chmod-ed before it listens so no one can connect
in between, and removed at shutdown unless another
process has replaced it meanwhile. Each client gets a ``QMPSession``; its commands run
one after another in the server's worker threads (they fsync bitmap state), so the
event loop keeps serving NBD while they do, and replies keep the commands' order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, cast

from nbdtrack.control.commands import Control
from nbdtrack.control.session import Execute, QMPSession, Send
from nbdtrack.server.activation import stale_unix_socket

if TYPE_CHECKING:
    from nbdtrack.server.server import NBDServer

log = logging.getLogger("nbdtrack.control")

SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660  # with a configured group: its members may manage bitmaps
MAX_PENDING = 64  # queued messages of one client before its reading pauses


class ControlListener:
    def __init__(
        self, server: NBDServer, path: str, owner: int | None = None, group: int | None = None
    ) -> None:
        """``owner``/``group``: uid and gid to give the socket (None: the process's)."""
        self.server = server
        self.path = path
        self.owner = owner
        self.group = group
        self.control = Control(server.registry)
        self.pending_cleanups: set[asyncio.Task] = set()
        self.connections: set[ControlConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind, restrict to the owner, listen. Raises OSError, also for a live socket."""
        if stale_unix_socket(self.path):  # left by a dead server; a live one raises
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            try:
                if self.owner is not None or self.group is not None:
                    os.chown(
                        self.path,
                        -1 if self.owner is None else self.owner,
                        -1 if self.group is None else self.group,
                    )
                os.chmod(self.path, SOCKET_MODE if self.group is None else GROUP_SOCKET_MODE)
                st = os.stat(self.path)
                self._inode = (st.st_dev, st.st_ino)
                sock.listen(16)
                sock.setblocking(False)
                self._server = await asyncio.get_running_loop().create_unix_server(
                    self._connection, sock=sock
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
        except BaseException:
            sock.close()
            raise
        log.info("QMP control socket at %s", self.path)

    def _connection(self) -> ControlConnection:
        conn = ControlConnection(self)
        self.connections.add(conn)
        return conn

    async def close(self) -> None:
        """Stop accepting, drop the clients, remove the socket file if it is still ours."""
        self.control.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)


class ControlConnection(asyncio.Protocol):
    def __init__(self, listener: ControlListener) -> None:
        self.listener = listener
        self.session = QMPSession(listener.control)
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[Send | Execute | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        transport.write(self.session.greeting())
        self.task = asyncio.get_running_loop().create_task(self._serve())
        log.debug("control: client connected")

    def data_received(self, data: bytes) -> None:
        for event in self.session.receive_data(data):
            self.queue.put_nowait(event)
        if self.queue.qsize() >= MAX_PENDING and not self.reading_paused:
            assert self.transport is not None
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # Answer what was sent before the end of file (``echo ... | socat``), then close.
        self.queue.put_nowait(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self._writable.set()
        if self.task is not None:
            self.task.cancel()
        # Checkpoints this session opened with auto-abort end with it (at shutdown, the
        # exports abort every open checkpoint themselves).
        control = self.listener.control
        if not control.shutting_down:
            task = asyncio.get_running_loop().create_task(
                self.listener.server.run_blocking(control.session_closed, self.session)
            )
            self.listener.pending_cleanups.add(task)
            task.add_done_callback(self.listener.pending_cleanups.discard)
        log.debug("control: client disconnected")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while not transport.is_closing():
            event = await self.queue.get()
            if event is None:
                break
            if isinstance(event, Execute):
                try:
                    data = await self.listener.server.run_blocking(event.run)
                except RuntimeError:  # the worker threads are gone: the server is stopping
                    break
            else:
                data = event.data
            await self._writable.wait()
            if transport.is_closing():
                return
            transport.write(data)
            if self.reading_paused and self.queue.qsize() < MAX_PENDING // 2:
                self.reading_paused = False
                transport.resume_reading()
        transport.close()
