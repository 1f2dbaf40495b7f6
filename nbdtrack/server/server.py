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
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from nbdtrack.exports import Export, ExportRegistry
from nbdtrack.server import activation
from nbdtrack.server.connection import Connection
from nbdtrack.server.control import ControlListener
from nbdtrack.server.limits import ServerLimits
from nbdtrack.server.notify import Notifier, watchdog_interval
from nbdtrack.server.tls import TLSSettings

log = logging.getLogger("nbdtrack.server")
T = TypeVar("T")

DEFAULT_PORT = 10809
# After shutdown_timeout has cut the connections, flushing and saving bitmaps get this
# long before the process exits anyway (the journal keeps that safe).
HARD_STOP_GRACE = 15.0


class NBDServer:
    def __init__(
        self,
        registry: ExportRegistry,
        *,
        workers: int = 16,
        handshake_timeout: float = 10.0,
        max_connections: int = 256,
        shutdown_timeout: float = 30.0,
        limits: ServerLimits | None = None,
        tls: TLSSettings | None = None,
    ) -> None:
        self.registry = registry
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.shutdown_timeout = shutdown_timeout
        self.limits = limits or ServerLimits()
        self.tls = tls or TLSSettings()
        self.connections: set[Connection] = set()
        self.export_connections: dict[str, int] = {}  # in transmission, per export name
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._control: list[ControlListener] = []
        self._stop = asyncio.Event()
        self._catching_signals = False
        # Running as a service: systemd notifications, SIGHUP reloads, the bounded stop.
        self.notifier = Notifier.from_environment()
        self._reload: Callable[[], Awaitable[None]] | None = None
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._status_timer: asyncio.TimerHandle | None = None
        self._stopping = False

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking backend call in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # --- listeners ----------------------------------------------------------------

    def _new_connection(self) -> Connection:
        conn = Connection(self)
        self.connections.add(conn)
        self._status_changed()
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

    async def listen_inherited(self) -> int:
        """Serve on the sockets systemd passed (``LISTEN_FDS``); returns how many."""
        sockets = activation.inherited_sockets()
        for name, sock in sockets:
            await self.listen_socket(sock)
            log.debug("socket-activated listener '%s'", name)
        return len(sockets)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a socket that is already listening (socket activation)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            server = await loop.create_server(self._factory, sock=sock)
        self._servers.append(server)
        log.info("listening on inherited socket %s", _format_address(sock.getsockname()))

    async def listen_control(
        self, path: str, owner: int | None = None, group: int | None = None
    ) -> None:
        """The QMP control socket (mode 0600, 0660 with a group); OSError if it cannot be made."""
        listener = ControlListener(self, path, owner, group)
        await listener.start()
        self._control.append(listener)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._status_changed()
        name, conn.counted_export = conn.counted_export, None
        if name is not None:
            left = self.export_connections.get(name, 1) - 1
            if left > 0:
                self.export_connections[name] = left
            else:
                self.export_connections.pop(name, None)

    # --- per-export connection limits (asked by the handshake, in the event loop) ---

    def admit(self, export: Export) -> str | None:
        """Why a GO/EXPORT_NAME on ``export`` must be refused, or None to let it in."""
        limit = getattr(export, "max_connections", 0) or self.limits.max_connections_per_export
        if limit and self.export_connections.get(export.name, 0) >= limit:
            log.warning("export '%s': connection limit (%d) reached", export.name, limit)
            return f"export '{export.name}' has its maximum of {limit} connections"
        return None

    def export_opened(self, conn: Connection, export: Export) -> None:
        """Count a connection entering transmission (right after ``admit`` said yes)."""
        conn.counted_export = export.name
        self.export_connections[export.name] = self.export_connections.get(export.name, 0) + 1

    # --- exports at run time (reload) ---------------------------------------------

    def add_export(self, export: Export) -> None:
        """Publish an opened export: new connections can pick it at once."""
        self.registry.add(export)
        self._status_changed()

    async def remove_export(self, name: str) -> None:
        """Unpublish an export, let its connections finish, close them, then close it.

        Its checkpoints' snapshot exports (``NAME@CHECKPOINT``) go with it; connections
        to every other export are not touched.
        """
        export = self.registry.remove(name)
        gone = [export]
        for other in self.registry.listing():
            if other.name.startswith(name + "@") and other.frozen is not None:
                gone.append(self.registry.remove(other.name))
        conns = [conn for conn in self.connections if conn.export in gone]
        if conns:
            await self._finish_connections(conns)
        if not export.read_only:
            try:
                await self.run_blocking(export.backend.flush)
            except OSError as err:
                log.error("flushing export '%s' failed: %s", export.name, err)
        await self.run_blocking(export.close)
        self._status_changed()

    # --- lifecycle ----------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(
        self, reload: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Serve until SIGINT/SIGTERM, then shut down; SIGHUP runs ``reload``.

        Call it once listeners and exports are up: it tells systemd READY=1.
        """
        loop = asyncio.get_running_loop()
        self._reload = reload
        self.catch_signals()
        signals = [signal.SIGINT, signal.SIGTERM]
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
            signals.append(signal.SIGHUP)
        interval = watchdog_interval() if self.notifier.enabled else None
        watchdog = loop.create_task(self._watchdog(interval)) if interval else None
        self.notifier.ready(self.status_text())
        try:
            await self._stop.wait()
            self.notifier.stopping()
            # The handlers stay during the shutdown: a second signal must still force it.
            await self.shutdown()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._catching_signals = False

    def catch_signals(self) -> None:
        """From now on SIGINT and SIGTERM stop the server cleanly. Called before the
        listeners start, so that a stop sent as soon as the server says it listens (a
        test, a quick ``systemctl stop``) is a clean shutdown once it is up, not the
        default action, which kills the process before it saves its bitmaps."""
        if not self._catching_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
            self._catching_signals = True

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stop.is_set():
            self._force_exit(f"second {name}")
        log.info("%s received: shutting down", name)
        self._stop.set()

    def _force_exit(self, why: str) -> None:
        """Exit now. Safe: the dirty bits of every write were journaled before the write
        ran, so exports that did not close cleanly replay them at the next start."""
        log.error("%s: exiting now; unsaved bitmaps are recovered from the journal", why)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(1)

    def _on_reload_signal(self) -> None:
        if self._stopping or self._stop.is_set() or self._reload is None:
            return
        log.info("SIGHUP received: reloading the configuration")
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True  # once the running reload is done
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._run_reloads())

    async def _run_reloads(self) -> None:
        assert self._reload is not None
        while True:
            self._reload_again = False
            self.notifier.reloading()
            try:
                await self._reload()
            except Exception:  # a bug must not end a server that keeps serving
                log.exception("reload failed")
            self.notifier.ready(self.status_text())
            if not self._reload_again or self._stop.is_set():
                return

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop: if the loop wedges, systemd restarts us."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def status_text(self) -> str:
        """What ``systemctl status`` shows: exports and connections."""
        names = [export.name for export in self.registry]
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        n, m = len(names), len(self.connections)
        exports = f"{n} export{'s' if n != 1 else ''}" + (f" ({shown})" if names else "")
        return f"serving {exports}, {m} connection{'s' if m != 1 else ''}"

    def _status_changed(self) -> None:
        """Send STATUS= soon; bursts of connections make one datagram, not one each."""
        if not self.notifier.enabled or self._stopping or self._status_timer is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop
            loop = asyncio.get_running_loop()
            self._status_timer = loop.call_later(0.5, self._send_status)

    def _send_status(self) -> None:
        self._status_timer = None
        if not self._stopping:
            self.notifier.status(self.status_text())

    async def _finish_connections(self, conns: list[Connection]) -> None:
        """Let connections finish their requests (new ones get ESHUTDOWN) and close them;
        after ``shutdown_timeout`` cut the ones still busy."""
        done = asyncio.gather(*(conn.shutdown() for conn in conns), return_exceptions=True)
        try:
            await asyncio.wait_for(done, self.shutdown_timeout)
        except TimeoutError:
            busy = [conn for conn in conns if conn.transport and not conn.closed.done()]
            log.warning(
                "in-flight requests did not finish in %.0f s: cutting %d connection(s)",
                self.shutdown_timeout,
                len(busy),
            )
            for conn in busy:
                conn.transport.abort()

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests (new ones get ESHUTDOWN), flush,
        save bitmaps clean (no journal to replay), close: all within a bounded time."""
        if self._stopping:
            return
        self._stopping = True
        limit = self.shutdown_timeout + HARD_STOP_GRACE
        deadline = threading.Timer(
            limit, self._force_exit, (f"shutdown did not finish in {limit:.0f} s",)
        )
        deadline.daemon = True
        deadline.start()
        try:
            await self._shutdown()
        finally:
            deadline.cancel()

    async def _shutdown(self) -> None:
        if self._status_timer is not None:
            self._status_timer.cancel()
            self._status_timer = None
        for server in self._servers:
            server.close()
        for listener in self._control:
            await listener.close()
        if self._reload_task is not None:  # exports it opens are closed below
            await asyncio.gather(self._reload_task, return_exceptions=True)
        conns = list(self.connections)
        if conns:
            self.notifier.status(f"stopping: finishing the requests of {len(conns)} connections")
            await self._finish_connections(conns)
        self.notifier.status("stopping: flushing and saving bitmaps")
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
        # Off the event loop, so that a second signal is still heard meanwhile.
        await asyncio.to_thread(self._executor.shutdown, True)
        for export in self.registry:
            try:
                await asyncio.to_thread(export.close)
            except Exception as err:  # the others must still close
                log.error("closing export '%s' failed: %s", export.name, err)
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
