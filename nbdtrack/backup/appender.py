"""Appending a backup image's data clusters without going through the page cache.

A backup writes data nobody reads soon. Through the page cache, every page of it must
first be allocated (on a VM whose free memory goes back to the host, faulting fresh pages
in costs more than copying the data) and written back later, at ``fsync``, while it
evicts the host's working set. The appender instead gathers what is appended at the end
of the file into a few reused page-aligned buffers and writes each full buffer with
``O_DIRECT`` from a thread, so the copy goes on while the disk writes, and syncing the
image at the end has little left to wait for.

Where ``O_DIRECT`` is refused (tmpfs on older kernels, some FUSE file systems, a device
with a larger block size) or a write is not block-aligned, the same buffers are written
through the page cache and their writeback is started at once
(``posix_fadvise(DONTNEED)``), so the sync at the end waits for the tail only.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this
BUFFER_BYTES = 1024 * 1024
BUFFERS = 4  # one being filled, the rest being written


def pwrite_all(fd: int, data: bytes | bytearray | memoryview | mmap.mmap, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _open_direct(path: str) -> int:
    """A second descriptor of ``path`` with O_DIRECT, or -1 where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise


class Appender:
    """Sequential writes at the end of a file, written behind the caller by a thread.

    ``append`` copies into the current buffer and returns; ``flush`` waits until every
    appended byte is in the file (not yet durable: the caller syncs ``fd``). A write
    error is raised by the next ``append`` or ``flush``.
    """

    def __init__(
        self,
        fd: int,
        path: str,
        end: int,
        *,
        direct: bool = True,
        buffer_bytes: int = BUFFER_BYTES,
        buffers: int = BUFFERS,
    ) -> None:
        self._fd = fd
        self._direct_fd = _open_direct(path) if direct else -1
        self.end = end  # where the next appended byte goes
        self._buffer_bytes = buffer_bytes
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._made = 0
        self._max_buffers = buffers
        self._current: mmap.mmap | None = None
        self._base = self._filled = 0
        self._jobs: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None

    @property
    def direct(self) -> bool:
        """Whether writes still bypass the page cache."""
        return self._direct_fd >= 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_error()
        view = memoryview(data).cast("B")
        while view:
            if self._current is None:
                self._current = self._take_buffer()
                self._base, self._filled = self.end, 0
            n = min(len(view), self._buffer_bytes - self._filled)
            self._current[self._filled : self._filled + n] = view[:n]
            self._filled += n
            self.end += n
            view = view[n:]
            if self._filled == self._buffer_bytes:
                self._submit()

    def flush(self) -> None:
        """Return once everything appended is in the file; raise a write error."""
        if self._current is not None and self._filled:
            self._submit()
        with self._idle:
            while self._outstanding:
                self._idle.wait()
        self._raise_error()

    def close(self) -> None:
        """Stop the thread (after what is queued) and let go of the buffers."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        self._current = None  # the buffers are unmapped once nothing refers to them
        self._free = queue.SimpleQueue()

    def _take_buffer(self) -> mmap.mmap:
        if self._made < self._max_buffers and self._free.empty():
            self._made += 1
            return mmap.mmap(-1, self._buffer_bytes)  # page-aligned, as O_DIRECT needs
        return self._free.get()  # the thread hands one back once it is written

    def _submit(self) -> None:
        assert self._current is not None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="backup-writer", daemon=True)
            self._thread.start()
        with self._idle:
            self._outstanding += 1
        self._jobs.put((self._current, self._filled, self._base))
        self._current = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            buffer, length, offset = job
            try:
                if self._error is None:
                    self._write(buffer, length, offset)
            except Exception as err:  # raised in the caller; the thread goes on, idle
                self._error = err.with_traceback(None)  # its frames would pin the buffer
            finally:
                self._free.put(buffer)
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

    def _write(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        view = memoryview(buffer)[:length]
        try:
            if self._direct_fd >= 0 and not (length % ALIGN or offset % ALIGN):
                try:
                    pwrite_all(self._direct_fd, view, offset)
                    return
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    # The file system wants another alignment: the page cache from now on.
                    os.close(self._direct_fd)
                    self._direct_fd = -1
            pwrite_all(self._fd, view, offset)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        finally:
            view.release()
