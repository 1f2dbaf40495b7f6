"""VectoredWriter: replies sent with sendmsg while the transport has nothing buffered, the
rest through the transport, and every byte in order whatever the socket takes."""

from __future__ import annotations

import asyncio
import random
import socket

from nbdtrack.server.vectored import IOV_MAX, VectoredWriter


async def _exchange(pieces: list[list[bytes]], sndbuf: int) -> tuple[bytes, bool]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    writer = VectoredWriter(transport)
    direct = writer._sock is not None
    theirs.setblocking(False)
    received = bytearray()
    expected = sum(len(b) for batch in pieces for b in batch)
    for batch in pieces:
        writer.writelines(batch)
        await asyncio.sleep(0)
    while len(received) < expected:
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)
    writer.close()
    transport.close()
    theirs.close()
    return bytes(received), direct


def test_every_byte_arrives_in_order_through_partial_sends() -> None:
    rng = random.Random(1)
    sizes = [0, 1, 20, 4096, 65536, 300_000]
    pieces = [
        [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randint(1, 9))] for _ in range(40)
    ]
    pieces.append([b"h" * 16] * (IOV_MAX + 5))  # more buffers than one sendmsg takes
    received, direct = asyncio.run(_exchange(pieces, sndbuf=8192))
    assert direct  # a plain selector transport: the writer sends itself
    assert received == b"".join(b for batch in pieces for b in batch)
