"""Replies as lists of buffers, sent without joining them.

Python 3.11's asyncio joins the buffers given to ``writelines`` into one bytes object, so
every READ reply's data is copied once more before it reaches the socket (3.12 sends them
with ``sendmsg``). While the transport has nothing buffered, ``VectoredWriter`` sends
the list itself with ``sendmsg`` on a duplicate of the socket's descriptor, and hands
only what the socket did not take to the transport, which then keeps the order. TLS and
other event loops' transports go through ``writelines`` as before.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from asyncio.selector_events import _SelectorSocketTransport  # what joins in 3.11
from collections.abc import Sequence

IOV_MAX = 1024  # buffers per sendmsg (Linux's limit)


class VectoredWriter:
    """``writelines`` for one connection's transport."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._sock = _duplicate_socket(transport)

    def writelines(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        transport = self.transport
        if self._sock is not None and not transport.get_write_buffer_size():
            buffers = self._send(buffers)
        if buffers:
            transport.writelines(buffers)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(
        self, buffers: Sequence[bytes | bytearray | memoryview]
    ) -> Sequence[bytes | bytearray | memoryview]:
        """Send what the socket takes now; return the rest."""
        assert self._sock is not None
        pos = 0
        while pos < len(buffers):
            group = buffers[pos : pos + IOV_MAX]
            try:
                sent = self._sock.sendmsg(group)
            except OSError:  # full (EAGAIN), interrupted, or an error the transport reports
                return buffers[pos:]
            for buffer in group:
                size = memoryview(buffer).nbytes
                if sent < size:
                    rest = [memoryview(buffer).cast("B")[sent:]] if sent else [buffer]
                    return rest + list(buffers[pos + 1 :])
                sent -= size
                pos += 1
        return ()


def _duplicate_socket(transport: asyncio.Transport) -> socket.socket | None:
    if sys.version_info >= (3, 12) or not isinstance(transport, _SelectorSocketTransport):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    duplicate = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    duplicate.setblocking(False)  # as the transport's (the two share one file description)
    return duplicate
