"""Logging straight into systemd's journal (its native datagram protocol, no library).

Under systemd, stderr is already a journal stream, but journald reads a stream's unit and
command from the process that opened it, before ``exec``, and a fresh service can end up
filed under ``init.scope`` instead of its unit (seen in containers). A datagram carries
the sender's credentials, so each record lands under ``nbdtrack.service`` with its real
priority, and ``journalctl -u nbdtrack -p warning`` shows what it should.
"""

from __future__ import annotations

import logging
import os
import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def encode_field(name: str, value: str) -> bytes:
    """One field: ``NAME=value`` or, for values with newlines, the length-prefixed form."""
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


class JournalHandler(logging.Handler):
    """Sends each record as one journal entry; ``fallback`` gets it if that fails."""

    def __init__(
        self,
        identifier: str,
        path: str = JOURNAL_SOCKET,
        fallback: logging.Handler | None = None,
    ) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def entry(self, record: logging.LogRecord) -> bytes:
        priority = PRIORITIES.get(record.levelno, 2 if record.levelno > 40 else 6)
        return b"".join(
            [
                encode_field("MESSAGE", self.format(record)),
                encode_field("PRIORITY", str(priority)),
                encode_field("SYSLOG_IDENTIFIER", self.identifier),
                encode_field("NBDTRACK_LOGGER", record.name),
                encode_field("CODE_FILE", record.pathname),
                encode_field("CODE_LINE", str(record.lineno)),
                encode_field("CODE_FUNC", record.funcName),
            ]
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(self.entry(record), self.path)
        except OSError:
            if self.fallback is not None:
                self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal() -> bool:
    """systemd connected stderr to the journal (``JOURNAL_STREAM`` names it)."""
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


class _PriorityFormatter(logging.Formatter):
    """Prefixes every line with ``<PRIORITY>``, which journald turns into its level."""

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelno, 2 if record.levelno > 40 else 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def use_journal(logger: logging.Logger | None = None, socket_path: str = JOURNAL_SOCKET) -> None:
    """When stderr is the journal, log into it natively (each entry under our unit, with
    its priority); if its socket is not there, prefix stderr lines with ``<PRIORITY>``.
    Here rather than in ``service`` so that every command can call it without the config."""
    logger = logger or logging.getLogger()
    if not stderr_is_journal() or not logger.handlers:
        return
    stderr = logger.handlers[0]
    fmt = stderr.formatter._fmt if stderr.formatter is not None else None
    stderr.setFormatter(_PriorityFormatter(fmt))
    if os.path.exists(socket_path):
        handler = JournalHandler("nbdtrack", socket_path, fallback=stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.handlers = [handler]
