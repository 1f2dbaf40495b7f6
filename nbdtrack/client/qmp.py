"""A small synchronous QMP client, for the ``nbdtrack`` CLI and nbdtrack's control socket.

Blocking sockets and the standard library only: a CLI command opens the socket, reads
the greeting, negotiates, runs a command or two and exits, so an event loop (or the
``qemu.qmp`` package, which tests use as the reference client) would be weight without
use. It speaks plain QMP and works against QEMU's monitor as well. Events are skipped.
"""

from __future__ import annotations

import errno
import itertools
import json
import socket
from typing import Any

DEFAULT_TIMEOUT = 120.0  # bitmap changes fsync; a stuck server must still not hang a script


class QMPClientError(Exception):
    """The control socket could not be used; the message is one line for the user."""


class QMPConnectError(QMPClientError):
    """No socket, nobody listening, no permission, or not a QMP server."""


class QMPCommandError(QMPClientError):
    """The server refused a command: ``error_class`` and ``desc`` as QMP sent them."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class QMPControlClient:
    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict = {}
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._ids = itertools.count(1)

    def __enter__(self) -> QMPControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> dict:
        """Connect, read the greeting, negotiate capabilities; returns the greeting."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            raise QMPConnectError(_connect_message(self.path, err)) from None
        self._sock = sock
        self._file = sock.makefile("rb")
        try:
            greeting = self._read()
            if not isinstance(greeting.get("QMP"), dict):
                raise QMPConnectError(f"{self.path}: not a QMP socket (no greeting)")
            self.greeting = greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return greeting

    def execute(self, command: str, arguments: dict | None = None) -> Any:
        """Run a command; its "return" value, or QMPCommandError with the server's words."""
        msg_id = f"nbdtrack-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = arguments
        assert self._sock is not None
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as err:
            raise QMPClientError(f"{self.path}: cannot send: {err.strerror or err}") from None
        while True:
            reply = self._read()
            if "event" in reply or reply.get("id") != msg_id:
                continue  # events and answers to nobody: not ours
            if "error" in reply:
                error = reply["error"]
                raise QMPCommandError(str(error.get("class")), str(error.get("desc")))
            if "return" not in reply:
                raise QMPClientError(f"{self.path}: a reply without 'return': {reply}")
            return reply["return"]

    def _read(self) -> dict:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise QMPClientError(f"{self.path}: no answer in {self.timeout:g} s") from None
        except OSError as err:
            raise QMPClientError(f"{self.path}: {err.strerror or err}") from None
        if not line:
            raise QMPClientError(f"{self.path}: the server closed the connection")
        try:
            message = json.loads(line)
        except ValueError:
            raise QMPConnectError(f"{self.path}: not a QMP socket (got {line[:40]!r})") from None
        if not isinstance(message, dict):
            raise QMPConnectError(f"{self.path}: not a QMP socket (got {line[:40]!r})")
        return message

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _connect_message(path: str, err: OSError) -> str:
    hint = "is 'nbdtrack serve' running? --control PATH chooses the socket"
    if err.errno == errno.ENOENT:
        return f"no control socket at {path}: {hint}"
    if err.errno == errno.ECONNREFUSED:
        return f"nothing listens on control socket {path}: {hint}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"cannot connect to control socket {path}: permission denied (it is mode 0600)"
    return f"cannot connect to control socket {path}: {err.strerror or err}"
