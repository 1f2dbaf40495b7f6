"""Point-in-time snapshots by copy-before-write, for backups of a live export.

``CopyBeforeWrite`` is a filter on the live export. While a ``Snapshot`` is open, a
write to a cluster the snapshot still needs first copies the cluster's old data into a
sparse fleece file; the snapshot reads saved clusters from there and the rest from the
live image, so it stays exactly as the image was when it opened. TRIM on the snapshot
releases clusters the backup has copied: they are no longer saved or needed.

One lock per snapshot orders "save, then overwrite" against snapshot reads: a cluster
not yet saved has not been touched since the snapshot opened, because every writer
saves it (under the lock) before writing.
"""

from __future__ import annotations

import errno
import os
import threading

from bitarray import bitarray

from nbdtrack.storage.backend import DATA, Backend, Extent, Filter
from nbdtrack.storage.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

CLUSTER = 64 * 1024


class Snapshot:
    def __init__(self, live: Backend, fleece_path: str, cluster: int = CLUSTER) -> None:
        self.live = live
        self.size = live.size()
        self.cluster = cluster
        self.fleece_path = fleece_path
        self.fd = os.open(fleece_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, self.size)
        count = -(-self.size // cluster)
        self.needed = bitarray(count)
        self.needed.setall(1)
        self.saved = bitarray(count)
        self.saved.setall(0)
        self.released = bitarray(count)  # clusters the backup said it has copied
        self.released.setall(0)
        self.lock = threading.Lock()
        self.bytes_saved = 0

    def _clusters(self, offset: int, length: int) -> range:
        return range(offset // self.cluster, -(-(offset + length) // self.cluster))

    def _span(self, index: int) -> tuple[int, int]:
        start = index * self.cluster
        return start, min(self.cluster, self.size - start)

    def preserve(self, offset: int, length: int) -> None:
        """Save the old data of every needed cluster in the range, before a write."""
        clusters = self._clusters(offset, length)
        with self.lock:
            if self.fd < 0:  # closed while this write was on its way: nothing to keep
                return
            for index in clusters:
                if self.needed[index] and not self.saved[index]:
                    start, span = self._span(index)
                    data = self.live.pread(span, start)
                    os.pwrite(self.fd, data, start)
                    self.saved[index] = 1
                    self.bytes_saved += span

    def read(self, length: int, offset: int) -> bytes:
        out = bytearray()
        end = offset + length
        with self.lock:
            pos = offset
            while pos < end:
                index = pos // self.cluster
                run_end = min((index + 1) * self.cluster, end)
                if self.saved[index]:
                    out += os.pread(self.fd, run_end - pos, pos)
                else:
                    out += self.live.pread(run_end - pos, pos)
                pos = run_end
        return bytes(out)

    def read_nowait(self, length: int, offset: int) -> bytes | bytearray | None:
        """From the live image's page cache, if no cluster of the range was saved.

        The event loop's read: it never waits for the lock (a writer may hold it while
        it saves a cluster), and under the lock no writer can overwrite an unsaved one.
        """
        if not self.lock.acquire(blocking=False):
            return None
        try:
            clusters = self._clusters(offset, length)
            if self.fd < 0 or self.saved.find(1, clusters.start, clusters.stop) >= 0:
                return None
            return self.live.pread_nowait(length, offset)
        finally:
            self.lock.release()

    def release(self, offset: int, length: int) -> None:
        """The backup copied [offset, offset+length): whole clusters in it are done."""
        first = -(-offset // self.cluster)
        last = (offset + length) // self.cluster
        if offset + length >= self.size:
            last = len(self.needed)
        if first >= last:
            return
        with self.lock:
            self.needed[first:last] = 0
            self.released[first:last] = 1
            if self.saved[first:last].any():
                self.saved[first:last] = 0
                start, end = first * self.cluster, min(last * self.cluster, self.size)
                try:
                    fallocate(
                        self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start
                    )
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Live allocation, except that saved clusters are data."""
        with self.lock:
            live = self.live.extents(offset, length)
            if not self.saved.any():
                return live
            out: list[Extent] = []
            pos = offset
            for ext_length, flags in live:
                end = pos + ext_length
                while pos < end:
                    index = pos // self.cluster
                    run_end = min((index + 1) * self.cluster, end)
                    state = DATA if self.saved[index] else flags
                    if out and out[-1].flags == state:
                        out[-1] = Extent(out[-1].length + run_end - pos, state)
                    else:
                        out.append(Extent(run_end - pos, state))
                    pos = run_end
            return out

    def close(self) -> None:
        with self.lock:
            if self.fd < 0:
                return
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.fleece_path)
            except FileNotFoundError:
                pass


class CopyBeforeWrite(Filter):
    """On the live export: keeps every open snapshot exact while clients write."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.snapshots: list[Snapshot] = []

    def open_snapshot(self, fleece_path: str, cluster: int = CLUSTER) -> Snapshot:
        """Call with writes quiesced: the snapshot is the image as it is now."""
        snapshot = Snapshot(self.inner, fleece_path, cluster)
        self.snapshots = [*self.snapshots, snapshot]
        return snapshot

    def close_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshots = [s for s in self.snapshots if s is not snapshot]
        snapshot.close()

    def _preserve(self, offset: int, length: int) -> None:
        for snapshot in self.snapshots:
            snapshot.preserve(offset, length)

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        if self.snapshots:  # usually none open: skip the call
            self._preserve(offset, len(data))
        self.inner.pwrite(data, offset, fua)

    def pwrite_now(self, data: bytes | memoryview, offset: int) -> bool:
        """Only with no snapshot open: saving old data reads and writes, under a lock.
        (Snapshots open while writes are quiesced, so none appears during this write.)"""
        return not self.snapshots and self.inner.pwrite_now(data, offset)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        self._preserve(offset, length)
        self.inner.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._preserve(offset, length)
        self.inner.trim(offset, length, fua)


class SnapshotBackend(Backend):
    """The snapshot as an export's backend: reads, allocation, and TRIM to release."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def size(self) -> int:
        return self.snapshot.size

    def can_write(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return True

    def can_extents(self) -> bool:
        return self.snapshot.live.can_extents()

    def pread(self, length: int, offset: int) -> bytes:
        return self.snapshot.read(length, offset)

    def pread_nowait(self, length: int, offset: int) -> bytes | bytearray | None:
        return self.snapshot.read_nowait(length, offset)

    def may_have_holes(self) -> bool:
        """Saved clusters are data, and a live image without holes now had none when the
        snapshot was taken (the flag is only ever set)."""
        return self.snapshot.live.may_have_holes()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.snapshot.release(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.snapshot.extents(offset, length)
