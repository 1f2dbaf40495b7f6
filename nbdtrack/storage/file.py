"""The raw-file backend: a regular file or a block device, served as it is.

Reads and writes are positional (``os.pread``/``os.pwrite``), so one descriptor serves
every connection and a ``fdatasync`` on it makes every completed write durable — which
is what lets the server advertise CAN_MULTI_CONN. Holes are punched and ranges zeroed
with ``fallocate`` (``BLKDISCARD``/``BLKZEROOUT`` on block devices); allocation comes
from ``SEEK_DATA``/``SEEK_HOLE``.

Reads of cached data are tried first with ``RWF_NOWAIT`` on the caller's (event loop)
thread: it fails with EAGAIN instead of waiting for the disk, and the read then goes to
a worker thread. Small whole-page writes are made there too (``pwrite_now``). A file
found without holes at open is taken to have none until the server punches or zeroes a
range, and until then READs skip the ``lseek`` hole search.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from time import monotonic

from nbdtrack.storage.backend import DATA, HOLE, Backend, Extent

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
_ZERO_CHUNK = 1024 * 1024
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
PAGE = 4096
WRITE_NOW_MAX = 2 * 1024 * 1024  # largest write done on the event loop thread (~0.4 ms)
WRITE_NOW_SLOW = 0.01  # seconds: a write this slow on the loop (throttled, not preempted) ...
WRITE_NOW_PAUSE = 1.0  # ... sends writes to workers for this long

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(Backend):
    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{path}: not a regular file or block device")
        self._size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        # A filesystem without punch-hole support is found out once, then not asked again.
        self._can_punch = not self.is_block
        self._can_zero_range = not self.is_block
        self._nowait = bool(RWF_NOWAIT) and hasattr(os, "preadv")
        self._holes = not self.is_block and _has_hole(self.fd, self._size)
        self._write_now_paused = 0.0  # monotonic time until which writes use workers

    def size(self) -> int:
        return self._size

    def can_write(self) -> bool:
        return not self.read_only

    def can_extents(self) -> bool:
        return not self.is_block

    def can_fast_zero(self) -> bool:
        return True

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            more = os.pread(self.fd, length - done, offset + done)
            if not more:  # past the end of a file that shrank under us
                raise OSError(errno.EIO, "short read")
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def pread_nowait(self, length: int, offset: int) -> bytes | bytearray | None:
        if not self._nowait:
            return None
        buf = bytearray(length)
        try:
            done = os.preadv(self.fd, (buf,), offset, RWF_NOWAIT)
        except BlockingIOError:  # not all in the page cache
            return None
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait = False  # a filesystem or kernel without it: stop trying
            return None  # the worker's pread reports any real error
        return buf if done == length else None

    def may_have_holes(self) -> bool:
        return self._holes

    def pwrite_now(self, data: bytes | memoryview, offset: int) -> bool:
        """Whole-page writes up to WRITE_NOW_MAX go straight into the page cache: they
        read nothing first, and a 4 KiB one takes a few microseconds, less than the
        hand-off to a worker; a 1 MiB one ~0.2 ms, while the hand-off (a futex storm
        between the loop, the worker and the GIL) cost more CPU than the copy. If one is
        slow after all (the kernel throttling a writer behind on writeback), writes go to
        workers for a while, so that other connections are not held up."""
        length = len(data)
        if (
            not 0 < length <= WRITE_NOW_MAX
            or (offset | length) & (PAGE - 1)
            or self.read_only
            or (self._write_now_paused and monotonic() < self._write_now_paused)
        ):
            return False
        start = monotonic()
        self.pwrite(data, offset)
        if monotonic() - start > WRITE_NOW_SLOW:
            self._write_now_paused = monotonic() + WRITE_NOW_PAUSE
        return True

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError:
                pass  # TRIM is a hint
        elif self._can_punch:
            self._holes = True  # before the punch: a concurrent READ must look for it
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_punch = False
        if fua:
            os.fdatasync(self.fd)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        if not self._zero_fast(offset, length, may_trim):
            if fast:
                raise OSError(errno.ENOTSUP, "cannot zero this range fast")
            self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def _zero_fast(self, offset: int, length: int, may_trim: bool) -> bool:
        """Zero without writing data; False when the storage cannot."""
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return True
            except OSError:
                return False
        attempts = []
        if may_trim and self._can_punch:
            attempts.append(("_can_punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
        if self._can_zero_range:
            attempts.append(("_can_zero_range", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        for capability, mode in attempts:
            self._holes = True  # punched or unwritten ranges read as holes
            try:
                fallocate(self.fd, mode, offset, length)
                return True
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                setattr(self, capability, False)
        return False

    def _write_zeroes(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.pwrite(memoryview(chunk)[:n], offset)
            offset += n

    def extents(self, offset: int, length: int) -> list[Extent]:
        if self.is_block:
            return [Extent(length, DATA)]
        end = offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: only a hole up to the end of file
                    raise
                data = end
            if data > pos:
                out.append(Extent(min(data, end) - pos, HOLE))
                pos = min(data, end)
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            out.append(Extent(min(hole, end) - pos, DATA))
            pos = min(hole, end)
        return out

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def identity(self) -> dict | None:
        st = os.fstat(self.fd)
        if self.is_block:
            # A block device's timestamps do not follow writes to it: only its size and
            # which device it is can be compared.
            return {"size": self._size, "rdev": st.st_rdev}
        return {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino,
            "dev": st.st_dev,
        }

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _has_hole(fd: int, size: int) -> bool:
    """Whether a regular file has a hole (SEEK_HOLE finds one before its end)."""
    if size == 0:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError:
        return True  # cannot tell: look for holes on every READ, as before
