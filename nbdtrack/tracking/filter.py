"""The tracking filter: marks dirty bitmaps before content-changing writes go down.

WRITE, WRITE_ZEROES and TRIM change content, so each marks its range first (a write
that then fails still counts: it may have written part). Reads, FLUSH, CACHE and
extents pass through untouched.
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
        with self.tracker.writing(offset, len(data)):
            self.inner.pwrite(data, offset, fua)

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        with self.tracker.writing(offset, length):
            self.inner.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        with self.tracker.writing(offset, length):
            self.inner.trim(offset, length, fua)

    def close(self) -> None:
        """Flush, then record a clean stop with the image's identity, then close."""
        if self.inner.can_write():
            self.inner.flush()
        self.tracker.close(self.inner.identity())
        self.inner.close()
