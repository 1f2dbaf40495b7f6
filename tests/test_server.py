"""Server behaviour around connections: limits, timeouts, vanishing clients, shutdown."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import nbd

from nbdtrack.protocol import constants as c
from tests.raw import recv_exact

MiB = 1024 * 1024


def raw_connect(srv, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
    greeting = recv_exact(sock, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    return sock


def raw_go(sock: socket.socket, name: bytes = b"disk") -> None:
    """Negotiate a simple-reply session with NBD_OPT_EXPORT_NAME."""
    sock.sendall(struct.pack(">I", 3) + c.OPTION_HEADER.pack(c.IHAVEOPT, 1, len(name)) + name)
    recv_exact(sock, 10)


def is_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_handshake_timeout_drops_silent_clients(nbd_server, image):
    srv = nbd_server(str(image), "--handshake-timeout", "0.5", export="disk")
    sock = raw_connect(srv)
    assert is_closed(sock, 5)
    sock.close()
    assert "handshake timed out" in srv.log


def test_connection_limit(nbd_server, image):
    srv = nbd_server(str(image), "--max-connections", "1", export="disk")
    first = nbd.NBD()
    first.connect_uri(srv.uri())
    second = socket.create_connection((srv.host, srv.port), timeout=5)
    assert is_closed(second, 5)
    second.close()
    assert first.pread(10, 0) == bytes(10)  # the first client is still served
    first.shutdown()
    time.sleep(0.2)
    third = nbd.NBD()
    third.connect_uri(srv.uri())
    third.shutdown()


def test_client_vanishing_mid_write_applies_nothing(nbd_server, image):
    srv = nbd_server(str(image), export="disk")
    sock = raw_connect(srv)
    raw_go(sock)
    header = c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, 1, 0, 65536)
    sock.sendall(header + b"\xaa" * 60000)  # 5536 bytes short
    sock.close()
    time.sleep(0.3)
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    assert h.pread(65536, 0) == bytes(65536)
    h.shutdown()
    assert image.read_bytes()[:65536] == bytes(65536)


def test_unknown_command_keeps_the_connection(nbd_server, image):
    srv = nbd_server(str(image), export="disk")
    sock = raw_connect(srv)
    raw_go(sock)
    sock.sendall(c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, 42, 7, 0, 0))
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (c.NBD_SIMPLE_REPLY_MAGIC, 22, 7)
    sock.sendall(c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, 8, 0, 4))
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (c.NBD_SIMPLE_REPLY_MAGIC, 0, 8)
    assert recv_exact(sock, 4) == bytes(4)
    sock.close()


def test_bad_request_magic_closes_only_that_connection(nbd_server, image):
    srv = nbd_server(str(image), export="disk")
    good = nbd.NBD()
    good.connect_uri(srv.uri())
    sock = raw_connect(srv)
    raw_go(sock)
    sock.sendall(b"\x00" * 28)
    assert is_closed(sock, 5)
    sock.close()
    good.pwrite(b"still here", 0)
    assert good.pread(10, 0) == b"still here"
    good.shutdown()


def test_disc_finishes_in_flight_writes(nbd_server, image):
    srv = nbd_server(str(image), export="disk")
    sock = raw_connect(srv)
    raw_go(sock)
    requests = b"".join(
        c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, i, i * MiB, MiB)
        + bytes([i + 1]) * MiB
        for i in range(8)
    )
    sock.sendall(requests + c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0, 0, 0))
    replies = b""
    sock.settimeout(10)
    while chunk := sock.recv(4096):
        replies += chunk
    sock.close()
    assert len(replies) == 8 * 16  # every write answered, DISC is not
    cookies = sorted(struct.unpack_from(">IIQ", replies, i * 16)[2] for i in range(8))
    assert cookies == list(range(8))
    data = image.read_bytes()
    for i in range(8):
        assert data[i * MiB : (i + 1) * MiB] == bytes([i + 1]) * MiB


def test_sigterm_finishes_in_flight_and_exits_zero(nbd_server, image):
    srv = nbd_server(str(image), export="disk")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    cookies = [h.aio_pwrite(bytes([i + 1]) * MiB, i * MiB) for i in range(16)]
    # wait until the server has every write, then stop it while they may still run
    while h.aio_in_flight() and any(not h.aio_command_completed(ck) for ck in cookies[:1]):
        h.poll(1)
    srv.proc.send_signal(signal.SIGTERM)
    acknowledged = set()
    try:
        while len(acknowledged) < len(cookies):
            h.poll(1)
            for i, ck in enumerate(cookies):
                if i not in acknowledged and h.aio_command_completed(ck):
                    acknowledged.add(i)
    except nbd.Error:
        pass  # the server closed the connection after its last reply
    assert srv.proc.wait(30) == 0
    data = image.read_bytes()
    for i in acknowledged:
        assert data[i * MiB : (i + 1) * MiB] == bytes([i + 1]) * MiB
    assert "shutting down" in srv.log and "stopped" in srv.log


def test_a_stop_during_start_up_is_a_clean_shutdown(image, tmp_path):
    """SIGTERM while the server is still starting (its control socket is there, its NBD
    listeners maybe not yet: what a quick ``systemctl stop`` or a test can do) reaches
    its handler, installed before the listeners: it finishes starting, then shuts down
    cleanly (exit 0, bitmaps saved), never killed by the default action."""
    state, control = tmp_path / "st", tmp_path / "control.sock"
    for n in range(3):
        log = tmp_path / f"server{n}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdtrack", "serve", str(image), "--name", "disk"]
            + ["--listen", "127.0.0.1:0", "--state-dir", str(state), "--control", str(control)]
            + ["--bitmap", "b"],
            stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not control.exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.001)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert "SIGTERM received: shutting down" in text and "unclean" not in text, text
        assert not control.exists()  # removed at shutdown: the next round waits for its own


def test_many_connections_at_once(nbd_server, image):
    srv = nbd_server(str(image), export="disk")
    errors = []

    def worker(n: int) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri())
            block = bytes([n]) * 65536
            for k in range(8):
                h.pwrite(block, (n * 8 + k) * 65536)
            for k in range(8):
                assert h.pread(65536, (n * 8 + k) * 65536) == block
            h.flush()
            h.shutdown()
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(1, 33)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = image.read_bytes()
    for n in range(1, 33):
        assert data[n * 8 * 65536 : (n + 1) * 8 * 65536] == bytes([n]) * (8 * 65536)


def test_pipelined_burst_each_request_answered_once(nbd_server, image):
    """Requests arriving together: cached reads and small aligned writes are served at
    once and their replies sent together, the rest (unaligned, FUA, large, refused) by
    tasks. Every cookie gets exactly one reply with the right error and data."""
    srv = nbd_server(str(image), export="disk")
    sock = raw_connect(srv)
    raw_go(sock)

    def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
        return c.REQUEST.pack(c.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def replies(count: int) -> dict[int, tuple[int, bytes]]:
        got: dict[int, tuple[int, bytes]] = {}
        for _ in range(count):
            magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
            assert magic == c.NBD_SIMPLE_REPLY_MAGIC and cookie not in got
            length = expect_data.get(cookie, 0) if error == 0 else 0
            got[cookie] = (error, recv_exact(sock, length))
        return got

    block = 4096
    expect_data: dict[int, int] = {}
    burst = b"".join(
        request(c.NBD_CMD_WRITE, n, n * block, block) + bytes([n + 1]) * block
        for n in range(64)
    )
    sock.sendall(burst)
    assert all(error == 0 for error, _ in replies(64).values())

    burst, expected = [], {}
    for n in range(64):  # reads of the first burst's data, served at once
        burst.append(request(c.NBD_CMD_READ, 100 + n, n * block, block))
        expect_data[100 + n] = block
        expected[100 + n] = (0, bytes([n + 1]) * block)
    for n in range(8):  # writes: aligned (at once), unaligned and FUA (tasks)
        offset, flags = MiB + n * 2 * block + (512 if n % 2 else 0), 0
        if n == 6:
            flags = c.NBD_CMD_FLAG_FUA
        burst.append(request(c.NBD_CMD_WRITE, 200 + n, offset, block, flags) + b"w" * block)
        expected[200 + n] = (0, b"")
    burst.append(request(c.NBD_CMD_READ, 300, 2 * MiB, 2 * MiB))  # large: a task
    expect_data[300] = 2 * MiB
    expected[300] = (0, bytes(2 * MiB))
    burst.append(request(c.NBD_CMD_READ, 301, 64 * MiB - block, 2 * block))  # past the end
    expected[301] = (c.NBD_EINVAL, b"")
    sock.sendall(b"".join(burst))
    assert replies(len(expected)) == expected
    sock.sendall(request(c.NBD_CMD_DISC, 0, 0, 0))
    sock.close()
    data = image.read_bytes()
    for n in range(8):
        offset = MiB + n * 2 * block + (512 if n % 2 else 0)
        assert data[offset : offset + block] == b"w" * block
