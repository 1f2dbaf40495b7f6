"""A bounded network fuzz: real client streams, recorded, mutated and replayed by the
thousand against a live server.

Recording: a small proxy on loopback sits between clients and the server and keeps
what each client sent — libnbd (nbdinfo --map/--list, the Python bindings), qemu-img and
qemu-io, and nbdtrack's own client in every reply mode (handshake, meta contexts,
block status, writes, reads, zeroes, trims, DISC). Fuzzing: each session is mutated
(bit flips, interesting integers in length/offset fields, cuts, deletions,
duplications, splices of two sessions) and replayed in random-sized pieces, many at a
time. After every batch: the server process is alive, a fresh client still works
(handshake, write, read back, block status, within seconds), the server's socket count
is back to its baseline (no leaked connections), and its log holds no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import nbd

from nbdtrack.client import connect, list_exports, list_meta_contexts
from nbdtrack.protocol import constants as c

MiB = 1024 * 1024
TIME_BUDGET = 40.0  # seconds of replaying
MIN_SESSIONS = 2000
BATCH = 250
CONCURRENCY = 48


# --- recording ------------------------------------------------------------------------------


class RecordingProxy:
    """Forwards loopback connections to the server; keeps each client's bytes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sessions: list[bytes] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.target)
        sent = bytearray()

        def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
            try:
                while data := src.recv(65536):
                    if record:
                        sent.extend(data)
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        back = threading.Thread(target=pump, args=(server, client, False), daemon=True)
        back.start()
        pump(client, server, True)
        back.join(10)
        client.close()
        server.close()
        with self._lock:
            self.sessions.append(bytes(sent))

    def close(self) -> list[bytes]:
        self.listener.close()
        for thread in self._threads:
            thread.join(10)
        return self.sessions


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def record_sessions(port: int) -> None:
    """Drive every client we have through the proxy at ``port``."""
    uri = f"nbd://127.0.0.1:{port}/disk"
    run("nbdinfo", "--map", uri)
    run("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri)
    run("nbdinfo", "--list", f"nbd://127.0.0.1:{port}")
    run("nbdinfo", "--can", "trim", uri)
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    h.pwrite(b"libnbd" * 1000, 65536)
    h.pread(8192, 0)
    h.zero(65536, 3 * MiB)
    h.trim(65536, 5 * MiB)
    h.flush()
    h.block_status(8 * MiB, 0, lambda *a: 0)
    h.shutdown()
    qemu = f"driver=nbd,host=127.0.0.1,port={port},export=disk"
    run("qemu-img", "info", "--image-opts", qemu)
    run("qemu-io", "--image-opts", qemu, "-c", "write -P 0x33 1M 128k", "-c", "read 0 64k")
    run("qemu-img", "map", "--output=json", "--image-opts", qemu)

    async def ours() -> None:
        target = ("127.0.0.1", port)
        contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
        for kw in ({}, {"extended": False}, {"extended": False, "structured": False}):
            async with await connect(target, "disk", meta_contexts=contexts, **kw) as client:
                await client.pwrite(os.urandom(70000), 3 * MiB + 17)
                await client.pread(70000, 3 * MiB)
                await client.zero(4 * MiB, 100000, no_hole=True)
                await client.trim(5 * MiB, 200000)
                await client.cache(0, 4096)
                await client.flush()
                if client.mode.value:
                    await client.block_status(0, 16 * MiB)
                    await client.pread(300000, 0, df=True)
        async with await connect(target, "disk", go=False, structured=False) as client:
            await client.pwrite(b"x" * 512, 0, fua=True)
            await client.pread(512, 0)
        await list_exports(target)
        await list_meta_contexts(target, "disk", ["qemu:"])

    asyncio.run(ours())


def synthetic_sessions() -> list[bytes]:
    """What no well-behaved client sends: STARTTLS and the like."""
    flags = struct.pack(">I", 3)

    def opt(code: int, data: bytes = b"") -> bytes:
        return c.OPTION_HEADER.pack(c.IHAVEOPT, code, len(data)) + data

    go = opt(c.NBD_OPT_GO, struct.pack(">I", 4) + b"disk" + b"\0\0")
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64)
    return [
        flags + opt(c.NBD_OPT_STARTTLS) + hello,
        flags + opt(c.NBD_OPT_STARTTLS) + go,
        flags + opt(c.NBD_OPT_STARTTLS),
        flags + opt(c.NBD_OPT_STRUCTURED_REPLY) + opt(c.NBD_OPT_STARTTLS) + opt(c.NBD_OPT_ABORT),
        flags + opt(c.NBD_OPT_EXTENDED_HEADERS) + go
        + c.EXTENDED_REQUEST.pack(c.NBD_EXTENDED_REQUEST_MAGIC, 0x20, 1, 1, 0, 8) + b"8 bytes!",
    ]  # fmt: skip


# --- mutation ---------------------------------------------------------------------------------

INTERESTING = [
    0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4095, 4096, 4097,
    32 * MiB, 32 * MiB + 1, 64 * MiB, 1 << 40, 1 << 63, (1 << 64) - 1,
]  # fmt: skip


def mutate(rng: random.Random, sessions: list[bytes]) -> bytes:
    data = bytearray(rng.choice(sessions))
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(9)
        pos = rng.randrange(len(data) + 1) if data else 0
        if kind == 0 and data:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:  # an interesting byte
            data[rng.randrange(len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, 1])
        elif kind in (2, 3) and len(data) >= 8:  # an interesting 32- or 64-bit field
            width = 4 if kind == 2 else 8
            at = rng.randrange(len(data) - width + 1)
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            data[at : at + width] = value.to_bytes(width, "big")
        elif kind == 4:  # cut
            del data[pos:]
        elif kind == 5 and data:  # delete a slice
            del data[pos : pos + rng.randint(1, 64)]
        elif kind == 6:  # duplicate a slice
            data[pos:pos] = data[pos : pos + rng.randint(1, 128)]
        elif kind == 7:  # random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        else:  # splice with another session
            other = rng.choice(sessions)
            data = data[:pos] + other[rng.randrange(len(other) + 1) :]
    return bytes(data)


async def replay(host: str, port: int, data: bytes, rng: random.Random) -> int:
    """Send ``data`` in random pieces, read whatever comes back; returns bytes received.

    Every task and future is awaited or has its exception retrieved before returning:
    one left to the garbage collector would log from inside some later test.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError):
        return -1
    received = 0

    async def drain() -> None:
        nonlocal received
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 0.3)
            if not chunk:
                return
            received += len(chunk)

    reading = asyncio.create_task(drain())
    try:
        pos = 0
        while pos < len(data) and not reading.done():
            step = rng.choice([1, 7, 64, 1500, 65536, len(data)])
            writer.write(data[pos : pos + step])
            pos += step
            if rng.random() < 0.2:
                await asyncio.sleep(0)
            await asyncio.wait_for(writer.drain(), 5)
        await asyncio.wait_for(asyncio.shield(reading), 10)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        if rng.random() < 0.3:
            writer.transport.abort()  # a reset rather than a clean end of file
        else:
            writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)
    return received


# --- checks -----------------------------------------------------------------------------------


def sockets_of(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def wait_for_sockets(pid: int, baseline: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (count := sockets_of(pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


async def health_check(host: str, port: int, k: int) -> None:
    async with asyncio.timeout(10):
        contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
        async with await connect((host, port), "disk", meta_contexts=contexts) as client:
            block = struct.pack(">Q", k) * 512
            await client.pwrite(block, 60 * MiB)
            assert await client.pread(4096, 60 * MiB) == block
            status = await client.block_status(60 * MiB, 4096)
            assert status["qemu:dirty-bitmap:b0"][0].flags == 1


def test_mutated_sessions_against_a_live_server(nbd_server, make_image, tls_certs):
    image = make_image(64 * MiB)
    srv = nbd_server(
        str(image),
        *tls_certs.server_args("on", verify_clients=False),
        "--bitmap", "b0:64K", "--handshake-timeout", "2", "--idle-timeout", "2",
        "--max-connections", "512",
        export="disk",
    )  # fmt: skip
    pid = srv.proc.pid
    baseline = sockets_of(pid)  # the listener and the control socket
    proxy = RecordingProxy((srv.host, srv.port))
    try:
        record_sessions(proxy.port)
    finally:
        recorded = proxy.close()
    assert len(recorded) >= 12 and all(recorded)
    sessions = recorded + synthetic_sessions()
    assert wait_for_sockets(pid, baseline) == baseline

    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    seed = rng.random()
    done = 0
    start = time.monotonic()

    async def batch(count: int) -> None:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            session_rng = random.Random(f"{seed}-{done}-{i}")
            data = sessions[i] if done == 0 and i < len(sessions) else mutate(session_rng, sessions)
            async with semaphore:
                await replay(srv.host, srv.port, data, session_rng)

        await asyncio.gather(*(one(i) for i in range(count)))

    rounds = 0
    while time.monotonic() - start < TIME_BUDGET or done < MIN_SESSIONS:
        asyncio.run(batch(BATCH))
        done += BATCH
        rounds += 1
        assert srv.proc.poll() is None, f"server died after {done} sessions:\n{srv.log[-3000:]}"
        asyncio.run(health_check(srv.host, srv.port, done))
        left = wait_for_sockets(pid, baseline)
        assert left <= baseline, f"{left - baseline} connections leaked after {done} sessions"
        assert time.monotonic() - start < 3 * TIME_BUDGET, "fuzzing far slower than planned"
    gc.collect()  # anything asyncio left behind is finalized here, not in a later test
    log = srv.log
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]
    assert srv.stop() == 0
    assert done >= MIN_SESSIONS and rounds >= 2
    print(f"{done} mutated sessions in {time.monotonic() - start:.1f} s (seed {seed})")
