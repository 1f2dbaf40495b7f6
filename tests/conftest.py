"""Shared fixtures: images, and nbdtrack servers started as real processes.

Servers listen on 127.0.0.1 port 0 (the kernel picks a free port; the server logs it)
or on a unix socket in the test's temp dir, and are stopped by pid at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Debian's nbdinfo/nbdcopy/qemu-img and python3-libnbd live in /usr/bin.
os.environ["PATH"] = "/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")
# Servers started without --state-dir must never touch the system's state directory.
_SESSION_STATE = tempfile.mkdtemp(prefix="nbdtrack-test-state-")
os.environ["STATE_DIRECTORY"] = _SESSION_STATE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_STATE, ignore_errors=True)

_LISTENING = re.compile(r"listening on (?:\[([^\]]+)\]|([^\s:]+)):(\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    log_path: Path
    host: str | None = None
    port: int | None = None
    unix: str | None = None
    export: str = ""
    extra: dict = field(default_factory=dict)
    control: str | None = None  # the QMP control socket, when known

    def uri(self, export: str | None = None) -> str:
        name = self.export if export is None else export
        if self.unix:
            return f"nbd+unix:///{name}?socket={self.unix}"
        return f"nbd://{self.host}:{self.port}/{name}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the server by pid; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    args: list[str],
    log_path: Path,
    *,
    unix: str | None = None,
    export: str = "",
    timeout: float = 20,
) -> ServerProcess:
    """Run ``nbdtrack serve ARGS`` and wait until it listens."""
    cmd = [sys.executable, "-m", "nbdtrack", "serve", *args]
    control = args[args.index("--control") + 1] if "--control" in args else None
    if "--state-dir" not in args and "--config" not in args:
        # never the system default, and never another server's (each locks its own)
        cmd += ["--state-dir", str(log_path.with_suffix(".state"))]
        if control is None:
            # Short enough for a unix socket path (108 bytes) under any pytest temp dir.
            control = str(log_path.with_suffix(".control.sock"))
            cmd += ["--control", control]
    elif control is None and "--state-dir" in args:
        control = os.path.join(args[args.index("--state-dir") + 1], "control.sock")
    if unix is None and not any(a == "--listen" or a.startswith("--listen=") for a in args):
        cmd += ["--listen", "127.0.0.1:0"]
    if unix is not None:
        cmd += ["--unix", unix]
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    server = ServerProcess(proc, log_path, unix=unix, export=export, control=control)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if unix is not None and "listening on unix socket" in text:
            return server
        match = _LISTENING.search(text)
        if match and unix is None:
            server.host = match.group(1) or match.group(2)
            server.port = int(match.group(3))
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server did not start listening:\n{log_path.read_text()}")


@pytest.fixture
def make_image(tmp_path: Path):
    """make_image(size, name="disk.img") -> path of a new sparse raw image."""

    def make(size: int = 64 * 1024 * 1024, name: str = "disk.img") -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    return make


@pytest.fixture
def image(make_image) -> Path:
    return make_image()


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator:
    """nbd_server(args..., unix=False) -> a running ServerProcess, stopped at teardown."""
    servers: list[ServerProcess] = []

    def start(
        *args: str, unix: bool = False, export: str = "", timeout: float = 20
    ) -> ServerProcess:
        n = len(servers)
        sock = str(tmp_path / f"nbd{n}.sock") if unix else None
        server = start_server(
            list(args), tmp_path / f"server{n}.log", unix=sock, export=export, timeout=timeout
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(nbd_server, image: Path) -> ServerProcess:
    """A server on a 64 MiB sparse image, export name 'disk'."""
    return nbd_server(str(image), export="disk")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """CA, server and client certificates made once per run (tests/tls_certs.py)."""
    from tests.tls_certs import make_certificates

    return make_certificates(tmp_path_factory.mktemp("tls") / "certs")
