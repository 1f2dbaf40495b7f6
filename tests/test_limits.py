"""Limits that bound memory and sockets under abuse: bytes in flight (a flood of 32 MiB
writes from many connections, RSS measured from /proc), connections per export, idle
timeout, option and name lengths, extents per BLOCK_STATUS chunk."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from nbdtrack.client import NBDConnectionError, NBDOptionError, connect
from nbdtrack.protocol import constants as c
from tests.raw import recv_exact

MiB = 1024 * 1024
PAYLOAD = 32 * MiB


def export_name_session(srv, name: bytes = b"disk") -> socket.socket:
    """A simple-reply session entered with NBD_OPT_EXPORT_NAME."""
    sock = socket.create_connection((srv.host, srv.port), timeout=60)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3) + c.OPTION_HEADER.pack(c.IHAVEOPT, 1, len(name)) + name)
    recv_exact(sock, 10)
    return sock


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


# --- a flood of 32 MiB writes ---------------------------------------------------------------

FLOODERS = 6
SLOTS = 4  # writes each flooder keeps in flight, one per 32 MiB slot of its own
WRITES = 8


def pattern(flooder: int, k: int) -> int:
    return (flooder * 37 + k * 11 + 1) & 0xFF


def flood(srv, index: int, acked: list[int], errors: list) -> None:
    """Send WRITES 32 MiB writes, SLOTS at a time, without waiting for more than that."""
    try:
        sock = export_name_session(srv)
        window = threading.Semaphore(SLOTS)
        base = index * SLOTS * PAYLOAD

        def replies() -> None:
            for _ in range(WRITES):
                magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
                assert magic == c.NBD_SIMPLE_REPLY_MAGIC and error == 0
                acked.append(cookie)
                window.release()

        reader = threading.Thread(target=replies)
        reader.start()
        for k in range(WRITES):
            window.acquire()
            header = c.REQUEST.pack(
                c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, k, base + (k % SLOTS) * PAYLOAD, PAYLOAD
            )
            sock.sendall(header + bytes([pattern(index, k)]) * PAYLOAD)
        reader.join()
        sock.close()
    except Exception as err:  # collected and asserted by the test
        errors.append(err)


def test_flood_of_large_writes_keeps_rss_bounded(nbd_server, make_image):
    cap = 32 * MiB
    image = make_image(FLOODERS * SLOTS * PAYLOAD + 64 * MiB)
    srv = nbd_server(str(image), "--max-bytes-in-flight", str(cap), export="disk")
    pid = srv.proc.pid
    base_rss = rss(pid)
    samples: list[int] = []
    latencies: list[float] = []
    stop = threading.Event()
    errors: list = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss(pid))
            time.sleep(0.05)

    victim_area = FLOODERS * SLOTS * PAYLOAD

    def victim() -> None:
        """Another client: small writes and reads, each answered promptly, all correct."""
        try:
            sock = export_name_session(srv)
            k = 0
            while not stop.is_set():
                block = bytes([k & 0xFF]) * 4096
                start = time.monotonic()
                sock.sendall(
                    c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, k, victim_area, 4096)
                    + block
                )
                assert struct.unpack(">IIQ", recv_exact(sock, 16))[1:] == (0, k)
                sock.sendall(
                    c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, k, victim_area, 4096)
                )
                assert struct.unpack(">IIQ", recv_exact(sock, 16))[1:] == (0, k)
                assert recv_exact(sock, 4096) == block
                latencies.append(time.monotonic() - start)
                k += 1
                time.sleep(0.02)
            sock.close()
        except Exception as err:  # collected and asserted below
            errors.append(err)

    acked: list[list[int]] = [[] for _ in range(FLOODERS)]
    threads = [threading.Thread(target=sample), threading.Thread(target=victim)]
    threads += [
        threading.Thread(target=flood, args=(srv, i, acked[i], errors)) for i in range(FLOODERS)
    ]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join(120)
    stop.set()
    for t in threads[:2]:
        t.join(10)
    assert errors == []
    assert all(sorted(a) == list(range(WRITES)) for a in acked)

    # Clients pushed FLOODERS * SLOTS * 32 MiB (768 MiB) at the server at once; it held
    # at most one request filling plus the capped bytes in flight per connection.
    peak = max(samples)
    bound = FLOODERS * (cap + PAYLOAD) + 96 * MiB
    assert peak - base_rss < bound, f"RSS grew by {(peak - base_rss) >> 20} MiB"
    assert peak - base_rss < FLOODERS * SLOTS * PAYLOAD // 2
    # ... and gave it all back: a payload buffer lives only while its write is in flight,
    # so 48 writes of 32 MiB leave not one payload behind once the flood is over.
    deadline = time.monotonic() + 5  # the last buffers go as their tasks finish
    while (settled := rss(pid)) - base_rss >= PAYLOAD and time.monotonic() < deadline:
        time.sleep(0.1)
    assert settled - base_rss < PAYLOAD, f"RSS kept {(settled - base_rss) >> 20} MiB"
    assert len(latencies) >= 10 and max(latencies) < 10, latencies

    # Nothing acknowledged is lost: each slot holds its last write.
    with open(image, "rb") as f:
        for i in range(FLOODERS):
            for slot in range(SLOTS):
                last = max(k for k in range(WRITES) if k % SLOTS == slot)
                f.seek((i * SLOTS + slot) * PAYLOAD)
                data = f.read(PAYLOAD)
                assert data == bytes([pattern(i, last)]) * PAYLOAD, (i, slot)


# --- connections per export -----------------------------------------------------------------


def test_connections_per_export(nbd_server, make_image, tmp_path):
    a, b = make_image(MiB, "a.img"), make_image(MiB, "b.img")
    config = tmp_path / "limits.toml"
    config.write_text(
        "[server]\nmax-connections-per-export = 2\n"
        f'[[export]]\nname = "a"\npath = "{a}"\n'
        f'[[export]]\nname = "b"\npath = "{b}"\nmax-connections = 1\n'
    )
    srv = nbd_server("--config", str(config), "--state-dir", str(tmp_path / "state"))
    target = (srv.host, srv.port)

    async def main():
        first = [await connect(target, "a"), await connect(target, "a")]
        with pytest.raises(NBDOptionError) as err:
            await connect(target, "a")
        assert err.value.reply == c.NBD_REP_ERR_POLICY
        with pytest.raises(NBDConnectionError):  # EXPORT_NAME cannot be refused politely
            await connect(target, "a", go=False, structured=False)
        only_b = await connect(target, "b")  # other exports keep their own count
        with pytest.raises(NBDOptionError):
            await connect(target, "b")
        assert await first[0].pread(16, 0) == bytes(16)
        await first[0].disconnect()
        await asyncio.sleep(0.2)
        again = await connect(target, "a")  # a freed slot can be used again
        for client in (first[1], only_b, again):
            await client.disconnect()

    asyncio.run(main())
    assert "connection limit (2) reached" in srv.log
    assert "export 'b': connection limit (1) reached" in srv.log


# --- idle timeout ---------------------------------------------------------------------------


def test_idle_timeout(nbd_server, image):
    srv = nbd_server(str(image), "--idle-timeout", "1", export="disk")
    idle = export_name_session(srv)
    busy = export_name_session(srv)
    deadline = time.monotonic() + 2.5
    k = 0
    while time.monotonic() < deadline:  # a request every 0.3 s keeps it alive
        busy.sendall(c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_FLUSH, k, 0, 0))
        assert struct.unpack(">IIQ", recv_exact(busy, 16))[1:] == (0, k)
        k += 1
        time.sleep(0.3)
    idle.settimeout(1)
    assert idle.recv(16) == b""  # closed by the server
    # A client that asks for data and never reads it is cut off too.
    stuck = export_name_session(srv)
    for i in range(8):
        stuck.sendall(c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, i, 0, 8 * MiB))
    time.sleep(2.5)
    stuck.settimeout(5)
    got = 0
    try:
        while chunk := stuck.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    assert got < 8 * 8 * MiB
    for sock in (idle, busy, stuck):
        sock.close()
    assert "idle for 1 s, closing" in srv.log
    assert "replies unread for 1 s, closing" in srv.log


# --- option, name and extent caps -----------------------------------------------------------


def _option(sock: socket.socket, opt: int, data: bytes) -> tuple[int, bytes]:
    sock.sendall(c.OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data)) + data)
    magic, echoed, reply, length = c.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))
    assert magic == c.OPTION_REPLY_MAGIC and echoed == opt
    return reply, recv_exact(sock, length)


def test_option_and_name_length_caps(nbd_server, image):
    srv = nbd_server(
        str(image), "--max-option-length", "2048", "--max-name-length", "16", export="disk"
    )
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    reply, _ = _option(sock, c.NBD_OPT_LIST, b"x" * 4096)  # drained, not buffered
    assert reply == c.NBD_REP_ERR_TOO_BIG
    long_name = b"d" * 17
    go = struct.pack(">I", len(long_name)) + long_name + b"\0\0"
    reply, message = _option(sock, c.NBD_OPT_GO, go)
    assert reply == c.NBD_REP_ERR_INVALID and b"longer than 16" in message
    reply, _ = _option(sock, c.NBD_OPT_INFO, struct.pack(">I", 4) + b"disk\0\0")
    assert reply == c.NBD_REP_INFO  # still in sync, still serving
    sock.close()
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3) + c.OPTION_HEADER.pack(c.IHAVEOPT, 1, 17) + long_name)
    sock.settimeout(5)
    assert sock.recv(64) == b""  # EXPORT_NAME cannot be refused: closed
    sock.close()


def test_max_extents_per_chunk(nbd_server, make_image):
    image = make_image(4 * MiB)
    with open(image, "r+b") as f:
        for i in range(0, 4 * MiB, 128 * 1024):  # 32 data extents, 32 holes
            f.seek(i)
            f.write(b"\x01" * 4096)
    srv = nbd_server(str(image), "--max-extents", "3", export="disk")

    async def main():
        target = (srv.host, srv.port)
        async with await connect(target, "disk", meta_contexts=[c.BASE_ALLOCATION]) as nbd:
            pos, chunks = 0, 0
            while pos < 4 * MiB:
                extents = (await nbd.block_status(pos, 4 * MiB - pos))[c.BASE_ALLOCATION]
                assert 1 <= len(extents) <= 3
                pos += sum(e.length for e in extents)
                chunks += 1
            assert chunks >= 20  # 64 extents, at most 3 per reply

    asyncio.run(main())


def test_limit_flags_are_checked(image, tmp_path):
    import subprocess
    import sys

    for args, message in (
        (["--max-bytes-in-flight", "1000"], "max-bytes-in-flight must be at least"),
        (["--max-name-length", "5000"], "max-name-length must be between"),
        (["--idle-timeout", "-1"], "idle-timeout"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "nbdtrack", "serve", str(image), "--listen", "127.0.0.1:0",
             "--state-dir", str(tmp_path / "s"), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_unread_option_replies_stop_the_reading(nbd_server, image):
    """A client that floods LIST options and never reads the answers is not buffered."""
    srv = nbd_server(str(image), "--handshake-timeout", "4", export="disk")
    pid = srv.proc.pid
    before = rss(pid)
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    burst = c.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_LIST, 0) * 65536  # 1 MiB of options
    sent = 0
    sock.sendall(struct.pack(">I", 3))
    sock.settimeout(2)
    try:  # the server stops reading: our sends block, then time out
        for _ in range(64):
            sock.sendall(burst)
            sent += len(burst)
    except TimeoutError:
        pass
    grown = rss(pid) - before
    assert sent < 32 * MiB  # without backpressure all 64 MiB would go in (3 GiB of replies)
    assert grown < 48 * MiB, grown >> 20
    sock.close()
    with socket.create_connection((srv.host, srv.port), timeout=10) as other:
        assert recv_exact(other, 18)[:8] == b"NBDMAGIC"  # others are still served
