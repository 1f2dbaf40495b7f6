"""The NBD server: listeners, the connection set, worker threads, graceful shutdown.

This package is the only code that touches sockets. Listeners are TCP addresses, unix
socket paths, or already-listening sockets handed over (systemd socket activation).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from nbdtrack.exports import ExportRegistry
from nbdtrack.server.connection import Connection
from nbdtrack.server.control import ControlListener

log = logging.getLogger("nbdtrack.server")
T = TypeVar("T")

DEFAULT_PORT = 10809


class NBDServer:
    def __init__(
        self,
        registry: ExportRegistry,
        *,
        workers: int = 16,
        handshake_timeout: float = 10.0,
        max_connections: int = 256,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.registry = registry
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.shutdown_timeout = shutdown_timeout
        self.connections: set[Connection] = set()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._control: list[ControlListener] = []
        self._stop = asyncio.Event()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking backend call in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # --- listeners ----------------------------------------------------------------

    def _new_connection(self) -> Connection:
        conn = Connection(self)
        self.connections.add(conn)
        return conn

    def _factory(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            log.warning("connection limit (%d) reached, refusing a client", self.max_connections)
            return _Refuse()
        return self._new_connection()

    async def listen_tcp(self, host: str, port: int) -> list[tuple]:
        server = await asyncio.get_running_loop().create_server(
            self._factory, host, port, reuse_address=True
        )
        self._servers.append(server)
        addresses = [s.getsockname() for s in server.sockets]
        for address in addresses:
            log.info("listening on %s", _format_address(address))
        return addresses

    async def listen_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        server = await asyncio.get_running_loop().create_unix_server(self._factory, path)
        self._servers.append(server)
        self._unix_paths.append(path)
        log.info("listening on unix socket %s", path)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a socket that is already listening (socket activation)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            server = await loop.create_server(self._factory, sock=sock)
        self._servers.append(server)
        log.info("listening on inherited socket %s", _format_address(sock.getsockname()))

    async def listen_control(self, path: str) -> None:
        """The QMP control socket (mode 0600); raises OSError if it cannot be made."""
        listener = ControlListener(self, path)
        await listener.start()
        self._control.append(listener)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)

    # --- lifecycle ----------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await self.shutdown()

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received: shutting down", signal.Signals(sig).name)
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests, flush every export, close."""
        for server in self._servers:
            server.close()
        for listener in self._control:
            await listener.close()
        conns = list(self.connections)
        if conns:
            done = asyncio.gather(*(conn.shutdown() for conn in conns), return_exceptions=True)
            try:
                await asyncio.wait_for(done, self.shutdown_timeout)
            except TimeoutError:
                log.warning("in-flight requests did not finish in %.0f s", self.shutdown_timeout)
        for export in self.registry:
            if not export.read_only:
                try:
                    await self.run_blocking(export.backend.flush)
                except OSError as err:
                    log.error("flushing export '%s' failed: %s", export.name, err)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._executor.shutdown(wait=True)
        for export in self.registry:
            export.close()
        log.info("stopped")


class _Refuse(asyncio.Protocol):
    """Closes a connection over the limit at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _format_address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
