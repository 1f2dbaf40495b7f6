"""Durable file operations in one state directory.

Everything the tracking layer persists goes through this small interface, so that a
test can put a layer underneath that forgets every byte not yet synced (power loss).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from nbdtrack.tracking.errors import StateError


class JournalFile:
    """An append-only file whose appends become durable on ``sync``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def read_all(self) -> bytes:
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0)

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def reset(self, header: bytes) -> None:
        """Empty the file and start it again with ``header``, durably."""
        os.ftruncate(self.fd, 0)
        self.append(header)
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateFiles:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def lock(self) -> None:
        """Hold the directory for this process; a second server on it is refused."""
        fd = os.open(self.path("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateError(
                f"{self.directory} is in use by another nbdtrack (pid {holder or '?'})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", -1)
        if fd >= 0:
            os.close(fd)
            self._lock_fd = -1

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def read(self, name: str) -> bytes | None:
        try:
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace(self, name: str, data: bytes) -> None:
        """Atomically and durably make ``name`` hold ``data``: temp, fsync, rename, fsync dir."""
        tmp = self.path(name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a half-written copy only takes space on a full disk
            raise
        os.rename(tmp, self.path(name))
        self.sync_directory()

    def sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open_journal(self, name: str) -> JournalFile:
        return JournalFile(self.path(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))
