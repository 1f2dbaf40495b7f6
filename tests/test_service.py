"""Running as a service, without booting systemd: socket activation through
``systemd-socket-activate``, sd_notify seen by a datagram socket the test makes, SIGHUP
reloads, the SIGTERM lifecycle under load, and every kind of config error.

The real-systemd counterpart is tests/test_systemd.py.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdtrack.protocol import constants as c
from nbdtrack.server.journal import use_journal
from nbdtrack.tracking.journal import header as journal_header
from nbdtrack.tracking.statefile import decode_state
from tests.raw import recv_exact
from tests.test_tracking_server import dirty_set

KiB = 1024
MiB = 1024 * KiB


# --- helpers --------------------------------------------------------------------------


class Notifications:
    """The NOTIFY_SOCKET end that systemd would hold: a datagram socket of our own."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def _receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, value: str = "1", timeout: float = 20) -> dict[str, str]:
        """The next message with KEY=VALUE (earlier ones are kept in ``messages``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._receive(deadline - time.monotonic())
            if msg is not None and msg.get(key) == value:
                return msg
        raise AssertionError(f"no {key}={value} in {timeout} s; got {self.messages}")

    def drain(self, seconds: float) -> list[dict[str, str]]:
        got = []
        deadline = time.monotonic() + seconds
        while (msg := self._receive(deadline - time.monotonic())) is not None:
            got.append(msg)
            if time.monotonic() >= deadline:
                break
        return got

    def close(self) -> None:
        self.sock.close()


class Proc:
    """A process a test started, logging to a file; stopped by pid."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.log_path = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 20, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.count(needle) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"no '{needle}' in the log after {timeout} s:\n{self.log}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for unix sockets (108-byte limit), removed afterwards."""
    path = tempfile.mkdtemp(prefix="nbdt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify(short_dir: str) -> Iterator[Notifications]:
    n = Notifications(short_dir)
    yield n
    n.close()


@pytest.fixture
def procs() -> Iterator:
    """procs(cmd, log, env=None) -> a started Proc; every one is killed by pid at the end."""
    started: list[Proc] = []

    def start(cmd: list[str], log: Path, env: dict | None = None) -> Proc:
        p = Proc(cmd, log, env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nbdtrack", "serve", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(proc: Proc) -> int:
    proc.wait_log("listening on 127.0.0.1:")
    line = next(x for x in proc.log.splitlines() if "listening on 127.0.0.1:" in x)
    return int(line.rsplit(":", 1)[1])


def assert_clean_state(state_dir: Path, export: str = "disk") -> None:
    """A clean stop: the state file says so and the journal holds no record to replay."""
    directory = state_dir / "exports" / export
    state = decode_state((directory / "bitmaps").read_bytes(), str(directory / "bitmaps"))
    assert state.clean
    assert (directory / "journal").read_bytes() == journal_header(state.journal_id)


def raw_session(port: int, name: bytes = b"disk", rcvbuf: int | None = None) -> socket.socket:
    """A simple-reply session entered with NBD_OPT_EXPORT_NAME."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(20)
    assert recv_exact(sock, 18)[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3) + c.OPTION_HEADER.pack(c.IHAVEOPT, 1, len(name)) + name)
    recv_exact(sock, 10)
    return sock


def request(cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> bytes:
    return c.REQUEST.pack(c.NBD_REQUEST_MAGIC, 0, cmd, cookie, offset, length) + data


# --- socket activation and sd_notify --------------------------------------------------


def test_socket_activation_tcp_and_unix_with_notify(procs, notify, short_dir, tmp_path, image):
    """systemd-socket-activate holds a TCP and a unix socket; the first client starts
    nbdtrack with LISTEN_FDS=2; libnbd, nbdinfo and qemu-img connect; READY=1 comes
    once it serves, STATUS= follows the connections, STOPPING=1 comes at SIGTERM."""
    port = free_port()
    unix = os.path.join(short_dir, "nbd.sock")
    state = tmp_path / "state"
    cmd = [
        "systemd-socket-activate",
        "-l",
        f"127.0.0.1:{port}",
        "-l",
        unix,
        "--fdname=tcp:local",
        "-E",
        "NOTIFY_SOCKET",
        *serve_cmd(str(image), "--name", "disk", "--state-dir", str(state), "--bitmap", "b"),
        "--control",
        os.path.join(short_dir, "ctl.sock"),
    ]
    env = {**os.environ, "NOTIFY_SOCKET": notify.path}
    proc = procs(cmd, tmp_path / "activate.log", env)
    proc.wait_log(f"Listening on {unix}")
    assert not notify.drain(0.2), "nbdtrack must only start at the first connection"

    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port}/disk")  # waits in the backlog meanwhile
    ready = notify.wait_for("READY")
    assert ready["STATUS"].startswith("serving 1 export (disk)")
    h.pwrite(b"\xab" * 65536, 0)
    h.flush()
    status = notify.wait_for("STATUS", "serving 1 export (disk), 1 connection")
    assert "READY" not in status
    h.shutdown()

    # the same process (LISTEN_PID) serves both sockets; the configured default is unused
    log = proc.log
    assert f"listening on inherited socket 127.0.0.1:{port}" in log
    assert f"listening on inherited socket {unix}" in log
    assert "10809" not in log
    info = json.loads(
        subprocess.run(
            ["nbdinfo", "--json", f"nbd+unix:///disk?socket={unix}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["exports"][0]["export-size"] == image.stat().st_size
    qemu = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{port}/disk"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert qemu["virtual-size"] == image.stat().st_size
    copy = tmp_path / "copy.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", f"nbd+unix:///disk?socket={unix}", str(copy)],
        check=True,
        capture_output=True,
    )
    assert copy.read_bytes()[:65536] == b"\xab" * 65536

    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    stopping = notify.wait_for("STOPPING")
    assert stopping["STATUS"] == "stopping"
    assert "stopped" in proc.log
    assert_clean_state(state)


def test_watchdog_pings_when_systemd_asks(procs, notify, short_dir, tmp_path, image):
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    args = [str(image), "--state-dir", str(tmp_path / "st"), "--listen", "127.0.0.1:0"]
    args += ["--control", os.path.join(short_dir, "ctl.sock")]
    proc = procs(serve_cmd(*args), tmp_path / "serve.log", env)
    notify.wait_for("READY")
    pings = [m for m in notify.drain(1.0) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 5  # every 100 ms: half the timeout
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_no_watchdog_for_another_pid(procs, notify, short_dir, tmp_path, image):
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    env["WATCHDOG_PID"] = "1"
    args = [str(image), "--state-dir", str(tmp_path / "st"), "--listen", "127.0.0.1:0"]
    args += ["--control", os.path.join(short_dir, "ctl.sock")]
    proc = procs(serve_cmd(*args), tmp_path / "serve.log", env)
    notify.wait_for("READY")
    assert not [m for m in notify.drain(0.5) if "WATCHDOG" in m]
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_bad_inherited_descriptor_is_one_line(tmp_path, image):
    """LISTEN_FDS naming a descriptor that is not a listening socket: a clear error."""
    code = (
        "import os, sys\n"
        "r, w = os.pipe()\n"
        "os.dup2(r, 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='x')\n"
        "from nbdtrack.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["serve", str(image), "--state-dir", str(tmp_path / "st")]
    args += ["--control", str(tmp_path / "c.sock")]
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "LISTEN_FDS: descriptor 3 ('x'): not a socket" in last


def test_logs_go_to_the_journal_natively_with_priorities(monkeypatch, short_dir):
    """With stderr connected to the journal (JOURNAL_STREAM), records become native
    journal entries with PRIORITY; if the journal is gone, stderr lines get <PRIORITY>."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    path = os.path.join(short_dir, "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(5)
    stream = io.StringIO()
    logger = logging.getLogger("nbdtrack-journal-test")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers = [handler]
    try:
        use_journal(logger, path)
        logger.warning("two\nlines")
        entry = journal.recv(65536)
        assert b"PRIORITY=4\n" in entry and b"SYSLOG_IDENTIFIER=nbdtrack\n" in entry
        message = b"WARNING nbdtrack-journal-test: two\nlines"
        assert b"MESSAGE\n" + struct.pack("<Q", len(message)) + message + b"\n" in entry
        journal.close()
        os.unlink(path)
        logger.error("journal gone")
        assert stream.getvalue() == "<3>ERROR nbdtrack-journal-test: journal gone\n"
    finally:
        logger.handlers = []
        journal.close()


# --- SIGHUP: reload ---------------------------------------------------------------------


EXPORT = '[[export]]\nname = "{name}"\npath = "{path}"\n{extra}\n'


def write_config(path: Path, exports: list[tuple[str, Path, str]], server: str = "") -> None:
    body = "[server]\n" + server + "\n" if server else ""
    for name, image, extra in exports:
        body += EXPORT.format(name=name, path=image, extra=extra)
    path.write_text(body)


def test_sighup_reload_adds_and_removes_exports_keeping_other_clients(
    procs, notify, short_dir, tmp_path, make_image
):
    a, b, cc = make_image(MiB, "a.img"), make_image(MiB, "b.img"), make_image(2 * MiB, "c.img")
    config = tmp_path / "nbdtrack.toml"
    server = f'listen = ["127.0.0.1:0"]\nstate-dir = "{tmp_path / "st"}"\n'
    server += f'control = "{os.path.join(short_dir, "ctl.sock")}"\n'
    write_config(config, [("a", a, ""), ("b", b, "")], server)
    env = {**os.environ, "NOTIFY_SOCKET": notify.path}
    proc = procs(serve_cmd("--config", str(config)), tmp_path / "serve.log", env)
    port = listening_port(proc)
    notify.wait_for("READY")

    ha, hb = nbd.NBD(), nbd.NBD()
    ha.connect_uri(f"nbd://127.0.0.1:{port}/a")
    hb.connect_uri(f"nbd://127.0.0.1:{port}/b")
    ha.pwrite(b"\x01" * 4096, 0)

    # b goes, c comes, a gets a new description and a bitmap: a's client must not notice
    write_config(
        config,
        [("a", a, 'description = "renamed"\nbitmaps = ["fresh"]'), ("c", cc, "")],
        server,
    )
    proc.signal(signal.SIGHUP)
    notify.wait_for("RELOADING")
    ready = notify.wait_for("READY")
    assert ready["STATUS"].startswith("serving 2 exports (a, c)")
    proc.wait_log("reload done")

    ha.pwrite(b"\x02" * 4096, 4096)
    assert ha.pread(8192, 0) == b"\x01" * 4096 + b"\x02" * 4096
    with pytest.raises(nbd.Error):
        hb.pread(512, 0)  # its export is gone: finished and closed
    hc = nbd.NBD()
    hc.set_full_info(True)
    hc.add_meta_context("qemu:dirty-bitmap:fresh")
    hc.connect_uri(f"nbd://127.0.0.1:{port}/c")
    assert hc.get_size() == 2 * MiB
    hc.shutdown()
    h = nbd.NBD()
    h.set_full_info(True)
    h.add_meta_context("qemu:dirty-bitmap:fresh")
    h.connect_uri(f"nbd://127.0.0.1:{port}/a")
    assert h.get_export_description() == "renamed"
    assert h.can_meta_context("qemu:dirty-bitmap:fresh")
    h.shutdown()
    with pytest.raises(nbd.Error):
        nbd.NBD().connect_uri(f"nbd://127.0.0.1:{port}/b")

    # A broken file changes nothing: one error line, the same exports, READY=1 again.
    config.write_text(config.read_text() + "bogus = 1\n")
    proc.signal(signal.SIGHUP)
    notify.wait_for("RELOADING")
    ready = notify.wait_for("READY")
    assert ready["STATUS"].startswith("serving 2 exports (a, c)")
    proc.wait_log("reload failed, the running configuration stays")
    assert f"{config}: key 'export[1].bogus': unknown key" in proc.log
    assert ha.pread(4096, 4096) == b"\x02" * 4096
    ha.shutdown()

    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert_clean_state(tmp_path / "st", "a")
    assert_clean_state(tmp_path / "st", "b")  # removed by the reload: closed cleanly too
    assert "Traceback" not in proc.log


# --- SIGTERM --------------------------------------------------------------------------


def test_sigterm_under_load_loses_no_acknowledged_write_and_leaves_no_journal(
    procs, notify, short_dir, tmp_path, make_image
):
    size, block, writers = 64 * MiB, 64 * KiB, 8
    image = make_image(size)
    state = tmp_path / "st"
    args = [str(image), "--name", "disk", "--state-dir", str(state), "--bitmap", "b:64K"]
    args += ["--listen", "127.0.0.1:0", "--control", os.path.join(short_dir, "ctl.sock")]
    env = {**os.environ, "NOTIFY_SOCKET": notify.path}
    proc = procs(serve_cmd(*args), tmp_path / "serve.log", env)
    port = listening_port(proc)
    notify.wait_for("READY")

    per_writer = size // block // writers
    acknowledged: list[list[int]] = [[] for _ in range(writers)]
    failures: list[BaseException] = []
    started = threading.Barrier(writers + 1)

    def writer(n: int) -> None:
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
        started.wait()
        for k in range(per_writer):
            index = n * per_writer + k
            try:
                h.pwrite(struct.pack(">Q", index + 1) * (block // 8), index * block)
            except nbd.Error as err:  # ESHUTDOWN, or the connection closed under it
                if err.errnum not in (
                    errno.ESHUTDOWN,
                    errno.ENOTCONN,
                    errno.ECONNRESET,
                    errno.EPIPE,
                    None,
                    0,
                ):
                    failures.append(err)
                return
            acknowledged[n].append(index)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    started.wait()
    deadline = time.monotonic() + 10
    while sum(map(len, acknowledged)) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.signal(signal.SIGTERM)
    notify.wait_for("STOPPING")
    assert proc.wait(60) == 0
    for t in threads:
        t.join(30)
    assert failures == []
    done = sorted(i for acks in acknowledged for i in acks)
    assert len(done) >= 200
    assert len(done) < writers * per_writer, "the load did not outlast the SIGTERM"

    content = image.read_bytes()
    for index in done:
        expected = struct.pack(">Q", index + 1) * (block // 8)
        assert content[index * block : (index + 1) * block] == expected, index
    assert_clean_state(state)  # flushed and compacted: no journal to replay

    again = procs(serve_cmd(*args), tmp_path / "again.log", {**os.environ})
    port = listening_port(again)
    assert "recovered from an unclean stop" not in again.log
    assert "inconsistent" not in again.log
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
    dirty = dirty_set(h, "qemu:dirty-bitmap:b", size, block)
    h.shutdown()
    assert set(done) <= dirty
    again.signal(signal.SIGTERM)
    assert again.wait() == 0


def stuck_session(port: int) -> socket.socket:
    """A client with two 16 MiB READs in flight that reads no reply: the server's
    replies wait on a full socket, so its requests stay in flight."""
    sock = raw_session(port, rcvbuf=4096)
    sock.sendall(
        request(c.NBD_CMD_WRITE, 1, 0, 4096, b"\x5a" * 4096)
        + request(c.NBD_CMD_READ, 2, 0, 16 * MiB)
        + request(c.NBD_CMD_READ, 3, 16 * MiB, 16 * MiB)
    )
    return sock


def read_simple_replies(sock: socket.socket, lengths: dict[int, int]) -> dict[int, int]:
    """cookie -> error of simple replies, skipping the data of successful READs."""
    errors: dict[int, int] = {}
    while len(errors) < len(lengths):
        magic, error, cookie = c.SIMPLE_REPLY.unpack(recv_exact(sock, 16))
        assert magic == c.NBD_SIMPLE_REPLY_MAGIC
        if not error and lengths[cookie]:
            recv_exact(sock, lengths[cookie])
        errors[cookie] = error
    return errors


def test_requests_after_sigterm_get_eshutdown_while_in_flight_ones_finish(
    procs, short_dir, tmp_path, make_image
):
    image = make_image(64 * MiB)
    args = [str(image), "--name", "disk", "--state-dir", str(tmp_path / "st")]
    args += ["--listen", "127.0.0.1:0", "--control", os.path.join(short_dir, "ctl.sock")]
    proc = procs(serve_cmd(*args), tmp_path / "serve.log")
    port = listening_port(proc)
    sock = stuck_session(port)
    time.sleep(0.5)
    proc.signal(signal.SIGTERM)
    proc.wait_log("SIGTERM received")
    time.sleep(0.2)
    sock.sendall(request(c.NBD_CMD_WRITE, 4, 8 * MiB, 4096, b"\xee" * 4096))
    errors = read_simple_replies(sock, {1: 0, 2: 16 * MiB, 3: 16 * MiB, 4: 0})
    assert errors == {1: 0, 2: 0, 3: 0, 4: c.NBD_ESHUTDOWN}
    assert recv_exact_or_eof(sock) == b""  # then the server closes
    sock.close()
    assert proc.wait() == 0
    data = image.read_bytes()
    assert data[:4096] == b"\x5a" * 4096
    assert data[8 * MiB : 8 * MiB + 4096] == bytes(4096)  # refused, so never written
    assert_clean_state(tmp_path / "st")


def recv_exact_or_eof(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""


def test_shutdown_timeout_cuts_a_stuck_client_and_still_stops_cleanly(
    procs, short_dir, tmp_path, make_image
):
    image = make_image(64 * MiB)
    args = [str(image), "--name", "disk", "--state-dir", str(tmp_path / "st")]
    args += ["--listen", "127.0.0.1:0", "--control", os.path.join(short_dir, "ctl.sock")]
    proc = procs(serve_cmd(*args, "--shutdown-timeout", "1"), tmp_path / "serve.log")
    sock = stuck_session(listening_port(proc))
    time.sleep(0.5)
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert time.monotonic() - began < 10
    assert "did not finish in 1 s: cutting 1 connection" in proc.log
    sock.close()
    assert_clean_state(tmp_path / "st")
    assert image.read_bytes()[:4096] == b"\x5a" * 4096


def test_second_sigterm_forces_exit_and_the_journal_keeps_every_dirty_bit(
    procs, short_dir, tmp_path, make_image
):
    image = make_image(64 * MiB)
    state = tmp_path / "st"
    args = [str(image), "--name", "disk", "--state-dir", str(state), "--bitmap", "b:4K"]
    args += ["--listen", "127.0.0.1:0", "--control", os.path.join(short_dir, "ctl.sock")]
    proc = procs(serve_cmd(*args, "--shutdown-timeout", "60"), tmp_path / "serve.log")
    port = listening_port(proc)
    h = nbd.NBD()
    h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
    for i in range(16):
        h.pwrite(b"\x77" * 4096, i * MiB)
    sock = stuck_session(port)
    time.sleep(0.5)
    proc.signal(signal.SIGTERM)
    proc.wait_log("SIGTERM received")
    time.sleep(0.5)
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 1
    assert time.monotonic() - began < 5
    assert "second SIGTERM: exiting now" in proc.log
    sock.close()
    del h

    again = procs(serve_cmd(*args), tmp_path / "again.log")
    port = listening_port(again)
    assert "recovered from an unclean stop" in again.log
    assert "inconsistent" not in again.log
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:b")
    h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
    dirty = dirty_set(h, "qemu:dirty-bitmap:b", 64 * MiB, 4096)
    assert {i * MiB // 4096 for i in range(16)} | {0} <= dirty
    assert h.pread(4096, 15 * MiB) == b"\x77" * 4096
    h.shutdown()
    again.signal(signal.SIGTERM)
    assert again.wait() == 0
    assert_clean_state(state)


# --- config errors --------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbdtrack", *args], capture_output=True, text=True, timeout=60
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("nbdtrack: error: "), lines
    assert not [line for line in lines if line.startswith(("ERROR", "nbdtrack:"))][:-1]
    return lines[-1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# (body, key, reason): every kind of mistake; "{busy}" is a port in use.
CONFIG_ERRORS = [
    # unknown keys, at each level
    ("colour = 1\n", "key 'colour'", "unknown key"),
    ("[server]\nlisten-on = []\n", "key 'server.listen-on'", "unknown key"),
    ('[[export]]\npath = "a.img"\nsize = 3\n', "key 'export[0].size'", "unknown key"),
    # wrong types
    ("server = 5\n", "key 'server'", "expected dict, got int"),
    ("export = 5\n", "key 'export'", "expected list, got int"),
    ('[server]\nlisten = "127.0.0.1:1"\n', "key 'server.listen'", "expected list, got str"),
    ("[server]\nlisten = [1]\n", "key 'server.listen[0]'", "expected str, got int"),
    ("[server]\nunix = [true]\n", "key 'server.unix[0]'", "expected str, got bool"),
    ('[server]\nmax-connections = "9"\n', "key 'server.max-connections'", "expected int"),
    ("[server]\nhandshake-timeout = true\n", "key 'server.handshake-timeout'", "expected int"),
    ('[server]\nshutdown-timeout = "1m"\n', "key 'server.shutdown-timeout'", "expected int"),
    ("[server]\nstate-dir = 1\n", "key 'server.state-dir'", "expected str, got int"),
    ("[server]\ncontrol = []\n", "key 'server.control'", "expected str, got list"),
    ('[[export]]\npath = "a.img"\nread-only = "yes"\n', "key 'export[0].read-only'", "bool"),
    ('[[export]]\npath = "a.img"\nname = 7\n', "key 'export[0].name'", "expected str"),
    ('[[export]]\npath = "a.img"\nbitmaps = "b"\n', "key 'export[0].bitmaps'", "expected list"),
    ('[[export]]\npath = "a.img"\nbitmaps = [1]\n', "key 'export[0].bitmaps[0]'", "expected str"),
    # bad values
    ('[server]\nlisten = ["x:y"]\n', "key 'server.listen[0]'", "bad port 'y'"),
    ('[server]\nlisten = ["[::1"]\n', "key 'server.listen[0]'", "missing ']'"),
    ("[server]\nmax-connections = 0\n", "key 'server.max-connections'", "at least 1"),
    ("[server]\nhandshake-timeout = 0\n", "key 'server.handshake-timeout'", "more than 0"),
    ("[server]\nshutdown-timeout = -1\n", "key 'server.shutdown-timeout'", "more than 0"),
    (
        '[[export]]\npath = "a.img"\nbitmaps = ["b:3K"]\n',
        "key 'export[0].bitmaps[0]'",
        "Granularity must be power of 2",
    ),
    ('[[export]]\npath = "a.img"\nbitmaps = [""]\n', "key 'export[0].bitmaps[0]'", "name"),
    # missing things
    ('[[export]]\nname = "x"\n', "key 'export[0].path'", "missing"),
    ('[[export]]\npath = "gone.img"\n', "key 'export[0].path'", "image 'gone.img' does not exist"),
    # duplicates
    (
        '[[export]]\npath = "a.img"\n[[export]]\npath = "a.img"\n',
        "key 'export[1].name'",
        "duplicate export name 'a'",
    ),
    # not TOML at all: the parser's line and column stand for the key
    ("[server\n", "not valid TOML", "line 1"),
]


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    "body, key, reason", CONFIG_ERRORS, ids=[f"{i}-{e[1]}" for i, e in enumerate(CONFIG_ERRORS)]
)
def test_config_error_names_file_key_and_reason(tmp_path, make_image, command, body, key, reason):
    make_image(MiB, "a.img")
    config = tmp_path / "bad.toml"
    config.write_text(body)
    args = ["check-config", str(config)] if command == "check-config" else ["serve", "--config"]
    if command == "serve":
        args += [str(config), "--state-dir", str(tmp_path / "st")]
    line = one_line_error(run_cli(*args))
    assert f"{config}: " in line and key in line and reason in line, line


def test_port_in_use_names_file_key_and_reason(tmp_path, make_image, busy_port, short_dir):
    make_image(MiB, "a.img")
    config = tmp_path / "c.toml"
    control = os.path.join(short_dir, "ctl.sock")
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:0", "127.0.0.1:{busy_port}"]\ncontrol = "{control}"\n'
        '[[export]]\npath = "a.img"\n'
    )
    expected = f"{config}: key 'server.listen[1]': cannot listen on 127.0.0.1:{busy_port}: "
    for args in (
        ["check-config", str(config)],
        ["serve", "--config", str(config), "--state-dir", str(tmp_path / "st")],
    ):
        line = one_line_error(run_cli(*args))
        assert expected + "Address already in use" in line, line
    # the flag replaces the file's listeners, and is named instead
    line = one_line_error(
        run_cli("serve", "--config", str(config), "--listen", f"127.0.0.1:{busy_port}")
    )
    assert f"--listen 127.0.0.1:{busy_port}: cannot listen" in line, line
    # --no-bind: for the file of a server that is running
    ok = run_cli("check-config", "--no-bind", str(config))
    assert ok.returncode == 0 and "OK: 1 export (a)" in ok.stdout, ok


def test_unix_socket_in_use_names_file_key_and_reason(tmp_path, make_image, short_dir):
    make_image(MiB, "a.img")
    path = os.path.join(short_dir, "busy.sock")
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(path)
        busy.listen()
        config = tmp_path / "c.toml"
        config.write_text(f'[server]\nunix = ["{path}"]\n[[export]]\npath = "a.img"\n')
        line = one_line_error(run_cli("check-config", str(config)))
    assert f"{config}: key 'server.unix[0]': cannot listen on {path}: " in line, line
    assert "in use by another running server" in line


def test_image_that_cannot_be_opened_names_file_key_and_reason(tmp_path):
    (tmp_path / "dir.img").mkdir()
    config = tmp_path / "c.toml"
    config.write_text('[[export]]\npath = "dir.img"\n')
    line = one_line_error(run_cli("check-config", str(config)))
    assert f"{config}: key 'export[0].path': cannot open '{tmp_path / 'dir.img'}'" in line
    assert "read-write: Is a directory" in line
    line = one_line_error(
        run_cli("serve", "--config", str(config), "--state-dir", str(tmp_path / "st"))
    )
    assert f"{config}: key 'export[0].path': cannot open" in line and "directory" in line


def test_unreadable_and_empty_config(tmp_path):
    line = one_line_error(run_cli("check-config", str(tmp_path / "none.toml")))
    assert f"{tmp_path / 'none.toml'}: cannot read: No such file or directory" in line
    empty = tmp_path / "empty.toml"
    empty.write_text("[server]\n")
    line = one_line_error(run_cli("check-config", str(empty)))
    assert f"{empty}: key 'export': nothing to serve" in line


def test_check_config_accepts_the_sample_config(tmp_path):
    """systemd/nbdtrack.toml, pointed at an image here, passes and serves nothing."""
    sample = Path(__file__).resolve().parents[1] / "systemd" / "nbdtrack.toml"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    text = sample.read_text().replace("/var/lib/nbdtrack/images/disk.img", str(image))
    text = text.replace('"127.0.0.1:10809"', '"127.0.0.1:0"')
    config = tmp_path / "nbdtrack.toml"
    config.write_text(text)
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: OK: 1 export (disk)"
