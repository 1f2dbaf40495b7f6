"""The tracking filter: marks dirty bitmaps before content-changing writes go down.

WRITE, WRITE_ZEROES and TRIM change content, so each marks its range first (a write
that then fails still counts: it may have written part). Reads, FLUSH, CACHE and
extents pass through untouched. The mark/done pair is spelled out rather than taken
from ``DirtyTracker.writing``: a generator context manager per write costs more than a
write to a granule that is already dirty.
"""

from __future__ import annotations

from nbdtrack.storage.backend import Backend, Filter
from nbdtrack.tracking.tracker import DirtyTracker


class TrackingFilter(Filter):
    def __init__(self, inner: Backend, tracker: DirtyTracker) -> None:
        super().__init__(inner)
        self.tracker = tracker
        if inner.can_write():
            tracker.flush_image = inner.flush

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        tracker = self.tracker
        token = tracker.mark(offset, len(data))
        try:
            self.inner.pwrite(data, offset, fua)
        finally:
            tracker.done(token)

    def pwrite_now(self, data: bytes | memoryview, offset: int) -> bool:
        token = self.tracker.mark_now(offset, len(data))
        if token is None:  # a bit to set, a record to sync or a quiesce: not on the loop
            return False
        try:
            return self.inner.pwrite_now(data, offset)
        finally:
            self.tracker.done(token)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        token = self.tracker.mark(offset, length)
        try:
            self.inner.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        finally:
            self.tracker.done(token)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        token = self.tracker.mark(offset, length)
        try:
            self.inner.trim(offset, length, fua)
        finally:
            self.tracker.done(token)

    def close(self) -> None:
        """Flush, then record a clean stop with the image's identity, then close."""
        if self.inner.can_write():
            self.inner.flush()
        self.tracker.close(self.inner.identity())
        self.inner.close()
